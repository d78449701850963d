"""Model FLOPs of a Segmenter config by the spec's arithmetic (performance.md section 3).

Counts matmul MACs only (1 MAC = 2 FLOPs): per transformer block with N tokens, width d and MLP
width m, 4·N·d² (qkv + out) + 2·N·d·m (MLP) + 2·N²·d (q·kᵀ and A·v); plus the patch embedding
and the decoder's projections and mask readout. LayerNorm, softmax, GELU, the loss and the
upsample are ignored. A training step is 3× the forward (remat not counted): *model* FLOPs,
the numerator of MFU. For the ViT-B/16 rows at 512 this gives 258.6 GFLOPs (mask head) and
257.3 GFLOPs (RankSeg head) per crop, the numbers of performance.md section 3e.
"""

from __future__ import annotations

import ml_collections

from rankseg_jax.models import segmenter


def block_macs(tokens: int, width: int, mlp: int) -> int:
    """MACs of one pre-norm transformer block on `tokens` tokens."""
    return 4 * tokens * width**2 + 2 * tokens * width * mlp + 2 * tokens**2 * width


def encoder_macs(grid: tuple[int, int], width: int, depth: int, mlp: int, patch: int) -> int:
    """ViT encoder on a (gh, gw) patch grid: patch embedding + depth blocks on gh·gw + 1 tokens."""
    n = grid[0] * grid[1]
    return n * 3 * patch * patch * width + depth * block_macs(n + 1, width, mlp)


def mask_head_macs(n: int, d: int, mlp: int, n_cls: int, layers: int, d_enc: int) -> int:
    """Segmenter's mask transformer: proj_dec, blocks on n + n_cls tokens, readout."""
    return (
        n * d_enc * d
        + layers * block_macs(n + n_cls, d, mlp)
        + n * d * d
        + n_cls * d * d
        + n * n_cls * d
    )


def rankseg_head_macs(
    n: int, d: int, mlp: int, n_cls: int, k: int, layers: int, pooled: int, d_enc: int
) -> int:
    """RankSeg head: block 0 on pooled + n_cls tokens, blocks 1.. on n + k tokens, readout."""
    return (
        (pooled + n) * d_enc * d
        + block_macs(pooled + n_cls, d, mlp)
        + n_cls * d
        + (layers - 1) * block_macs(n + k, d, mlp)
        + n * d * d
        + k * d * d
        + n * k * d
    )


def forward_flops(model: ml_collections.ConfigDict, image_hw: tuple[int, int]) -> dict:
    """{'encoder', 'decoder', 'forward', 'train_step'} model FLOPs per image of size image_hw."""
    dims = segmenter.vit_dims(model)
    p = model.patch_size
    grid = (-(-image_hw[0] // p), -(-image_hw[1] // p))
    n = grid[0] * grid[1]
    enc = encoder_macs(grid, dims["width"], dims["depth"], dims["mlp_dim"], p)
    d, mlp, layers = dims["dec_width"], dims["dec_mlp_dim"], dims["dec_layers"]
    if model.classifier == "rankseg":
        dec = rankseg_head_macs(
            n, d, mlp, model.n_cls, model.k, layers, model.downsample**2, dims["width"]
        )
    else:
        slots = model.k if model.classifier == "gt" else model.n_cls
        dec = mask_head_macs(n, d, mlp, slots, layers, dims["width"])
    fwd = 2 * (enc + dec)
    return dict(encoder=2 * enc, decoder=2 * dec, forward=fwd, train_step=3 * fwd)
