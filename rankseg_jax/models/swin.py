"""mmseg's SwinTransformer backbone (the UperNet Swin rows, issue #18), NHWC.

Follows `mmseg/models/backbones/swin.py` of the RankSeg fork (mmseg 0.x layout) operation for
operation, so that converted mmseg checkpoints reproduce its outputs:

- patch embedding: a 4×4 / stride-4 conv after zero padding bottom/right to multiples of 4,
  then LayerNorm (eps 1e-5, as every LN here);
- each block: pre-norm shifted-window attention (odd blocks shift by window // 2) with the
  relative position bias table, then a pre-norm GELU MLP; both residuals carry drop-path, whose
  rate grows linearly over all blocks (`linspace(0, drop_path_rate, sum(depths))`);
- windows: the token map is zero padded bottom/right to multiples of the window *before* the
  cyclic shift; the shift mask (−100 between regions) is built on the padded map, and padded
  tokens are attended like real ones (mmseg does not mask them) and cropped afterwards;
- patch merging: zero pad to even sides, gather 2×2 neighbourhoods in `nn.Unfold` order
  (channel-major: c0(0,0), c0(0,1), c0(1,0), c0(1,1), c1(0,0) …), LayerNorm(4C), Linear(4C→2C,
  no bias);
- per-stage outputs: the stage's tokens *before* merging, through `norm{i}`.

Parameter names mirror the mmseg state dict (`stages_{i}/blocks_{j}/attn/w_msa/qkv`, ...), so
the checkpoint mapping is generic (convert/mmseg_upernet.py).

Registry component `swin` (models/registry.py): `CONFIG` (`config.model.swin`), `check_config`,
`build`, `out_width` (the four stage widths: a multi-level encoder), `size_multiple`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rankseg_jax.errors import ConfigError
from rankseg_jax.models.layers import (
    DropPath,
    Dtype,
    check_block_encoder,
    gelu,
    layer_norm,
)

TRUNC_INIT = nn.initializers.truncated_normal(0.02)


@dataclasses.dataclass(frozen=True)
class SwinVariant:
    """Sizes of one Swin backbone (mmseg's constructor arguments)."""

    embed_dims: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int = 4
    mlp_ratio: int = 4


SWIN_VARIANTS = {
    # Swin-B, ImageNet-22k 384 pretraining: the UperNet Swin-B rows (window 12).
    "swin_base_w12": SwinVariant(128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_base_w7": SwinVariant(128, (2, 2, 18, 2), (4, 8, 16, 32), 7),
    "swin_small_w7": SwinVariant(96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_tiny_w7": SwinVariant(96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    # The family fixtures' small model (official_family README): pads at every stage on 48².
    "swin_test": SwinVariant(16, (2, 2, 2, 2), (1, 2, 4, 8), 7),
}


def relative_position_index(window: int) -> np.ndarray:
    """(w², w²) index into the (2w−1)² bias table, as mmseg's WindowMSA builds it.

    Entry [i, j] = (r_i − r_j + w − 1)·(2w − 1) + (c_i − c_j + w − 1) for window positions
    i = (r_i, c_i), j = (r_j, c_j) in row-major order.
    """
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int32)


def shift_attention_mask(h_pad: int, w_pad: int, window: int, shift: int) -> np.ndarray:
    """(nW, w², w²) additive mask: 0 within a region of the rolled map, −100 across regions."""
    img = np.zeros((h_pad, w_pad), np.float32)
    cnt = 0
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for hs in slices:
        for ws in slices:
            img[hs, ws] = cnt
            cnt += 1
    win = img.reshape(h_pad // window, window, w_pad // window, window).transpose(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) with H, W multiples of `window` → (B·nW, w², C), windows row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(x: jax.Array, window: int, h: int, w: int) -> jax.Array:
    """Inverse of `window_partition`: (B·nW, w², C) → (B, H, W, C)."""
    c = x.shape[-1]
    x = x.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


class WindowMSA(nn.Module):
    """Window attention with the relative position bias (mmseg `WindowMSA`), x (B·nW, w², C)."""

    num_heads: int
    window_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        bw, n, c = x.shape
        hd = c // self.num_heads
        w = self.window_size
        table = self.param(
            "relative_position_bias_table",
            TRUNC_INIT,
            ((2 * w - 1) * (2 * w - 1), self.num_heads),
            jnp.float32,
        )
        qkv = nn.Dense(3 * c, dtype=self.dtype, kernel_init=TRUNC_INIT, name="qkv")(x)
        q, k, v = qkv.reshape(bw, n, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        q = q * jnp.asarray(hd**-0.5, q.dtype)  # torch: q scaled before the matmul
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        index = relative_position_index(w).reshape(-1)
        bias = table[index].reshape(n, n, self.num_heads).transpose(2, 0, 1)
        scores = scores + bias[None]
        if mask is not None:
            n_win = mask.shape[0]
            scores = scores.reshape(bw // n_win, n_win, self.num_heads, n, n) + mask[None, :, None]
            scores = scores.reshape(bw, self.num_heads, n, n)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bqhd", probs.astype(v.dtype), v).reshape(bw, n, c)
        return nn.Dense(c, dtype=self.dtype, kernel_init=TRUNC_INIT, name="proj")(out)


class ShiftWindowMSA(nn.Module):
    """Pads to window multiples, rolls by −shift, attends per window, rolls back, crops."""

    num_heads: int
    window_size: int
    shift_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, hw: tuple[int, int]) -> jax.Array:
        """x (B, H·W, C) → (B, H·W, C)."""
        b, _, c = x.shape
        h, w = hw
        win, shift = self.window_size, self.shift_size
        x = x.reshape(b, h, w, c)
        pad_b, pad_r = -h % win, -w % win
        if pad_b or pad_r:
            x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        hp, wp = h + pad_b, w + pad_r
        mask = None
        if shift > 0:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
            mask = jnp.asarray(shift_attention_mask(hp, wp, win, shift))
        attn = WindowMSA(self.num_heads, win, self.dtype, name="w_msa")
        out = window_reverse(attn(window_partition(x, win), mask), win, hp, wp)
        if shift > 0:
            out = jnp.roll(out, (shift, shift), axis=(1, 2))
        return out[:, :h, :w].reshape(b, h * w, c)


class SwinBlock(nn.Module):
    """norm1 → (shifted) window attention → +residual; norm2 → FFN → +residual."""

    num_heads: int
    window_size: int
    shift: bool
    mlp_ratio: int = 4
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, hw: tuple[int, int], deterministic: bool) -> jax.Array:
        c = x.shape[-1]
        shift = self.window_size // 2 if self.shift else 0
        y = layer_norm(1e-5, "norm1", self.dtype)(x)
        y = ShiftWindowMSA(self.num_heads, self.window_size, shift, self.dtype, name="attn")(y, hw)
        x = x + DropPath(self.drop_path)(y, deterministic)
        y = layer_norm(1e-5, "norm2", self.dtype)(x)
        y = FFN(self.mlp_ratio * c, self.dtype, name="ffn")(y)
        return x + DropPath(self.drop_path)(y, deterministic)


class FFN(nn.Module):
    """mmcv's FFN under its state-dict names: layers.0.0 (Linear) → GELU, layers.1 (Linear).

    Its dropouts are 0 in every Swin config here (drop_rate=0), so none is applied.
    """

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        y = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=TRUNC_INIT, name="layers_0_0")(x)
        return nn.Dense(c, dtype=self.dtype, kernel_init=TRUNC_INIT, name="layers_1")(gelu(y))


class PatchMerging(nn.Module):
    """2×2 neighbourhood merge in nn.Unfold order → LN(4C) → Linear(4C → out, no bias)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, hw: tuple[int, int]) -> tuple[jax.Array, tuple[int, int]]:
        """x (B, H·W, C) → (B, ⌈H/2⌉·⌈W/2⌉, out), new (H, W)."""
        b, _, c = x.shape
        h, w = hw
        x = x.reshape(b, h, w, c)
        if h % 2 or w % 2:
            x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        # (B, h2, 2, w2, 2, C) → (B, h2, w2, C, 2, 2): Unfold's channel-major, then kernel row/col.
        x = x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h2 * w2, 4 * c)
        x = layer_norm(1e-5, "norm", self.dtype)(x)
        x = nn.Dense(
            self.out_channels,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=TRUNC_INIT,
            name="reduction",
        )(x)
        return x, (h2, w2)


class SwinTransformer(nn.Module):
    """images (B, H, W, 3) → four NHWC maps at strides 4, 8, 16, 32 (channels C, 2C, 4C, 8C).

    Attributes:
        variant: the sizes (SWIN_VARIANTS).
        drop_path_rate: the last block's drop-path rate (0.3 in the Swin-B rows).
        remat: checkpoint each block (recompute in the backward pass) to save activation memory.
    """

    variant: SwinVariant
    drop_path_rate: float = 0.3
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
        """`train` turns drop-path on (rng 'dropout')."""
        deterministic = not train
        v = self.variant
        p = v.patch_size
        _, h, w, _ = images.shape
        ph, pw = -h % p, -w % p
        if ph or pw:
            images = jnp.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)))
        x = _PatchEmbed(v.embed_dims, p, self.dtype, name="patch_embed")(images)
        b, gh, gw, c = x.shape
        hw = (gh, gw)
        x = x.reshape(b, gh * gw, c)
        rates = np.linspace(0.0, self.drop_path_rate, sum(v.depths))
        block_cls = nn.remat(SwinBlock, static_argnums=(2, 3)) if self.remat else SwinBlock
        outs = []
        idx = 0
        for i, depth in enumerate(v.depths):
            stage = _Stage(
                num_heads=v.num_heads[i],
                window_size=v.window_size,
                rates=tuple(float(r) for r in rates[idx : idx + depth]),
                downsample=i < len(v.depths) - 1,
                mlp_ratio=v.mlp_ratio,
                dtype=self.dtype,
                block_cls=block_cls,
                name=f"stages_{i}",
            )
            idx += depth
            x_down, hw_down, out, hw_out = stage(x, hw, deterministic)
            out = layer_norm(1e-5, f"norm{i}", self.dtype)(out)
            outs.append(out.reshape(b, *hw_out, out.shape[-1]))
            x, hw = x_down, hw_down
        return outs


class _PatchEmbed(nn.Module):
    """Conv p×p / stride p ('projection') then LayerNorm ('norm').

    (B, H, W, 3) with H, W multiples of p → (B, H/p, W/p, C).
    """

    embed_dims: int
    patch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.embed_dims,
            (self.patch, self.patch),
            strides=(self.patch, self.patch),
            padding="VALID",
            dtype=self.dtype,
            name="projection",
        )(images)
        return layer_norm(1e-5, "norm", self.dtype)(x)


class _Stage(nn.Module):
    """`depth` Swin blocks (alternating shift) and the PatchMerging that follows (except last)."""

    num_heads: int
    window_size: int
    rates: tuple[float, ...]
    downsample: bool
    mlp_ratio: int = 4
    dtype: Dtype = jnp.float32
    block_cls: type = SwinBlock

    @nn.compact
    def __call__(self, x, hw, deterministic):
        """Returns (merged tokens, merged hw, stage output tokens, stage hw)."""
        for j, rate in enumerate(self.rates):
            block = self.block_cls(
                self.num_heads,
                self.window_size,
                j % 2 == 1,
                self.mlp_ratio,
                rate,
                self.dtype,
                name=f"blocks_{j}",
            )
            x = block(x, hw, deterministic)
        if not self.downsample:
            return x, hw, x, hw
        merged, hw_down = PatchMerging(2 * x.shape[-1], self.dtype, name="downsample")(x, hw)
        return merged, hw_down, x, hw


# --------------------------------------------------------------------------------------------
# Registry component `swin`
# --------------------------------------------------------------------------------------------

# `config.model.swin`: the UperNet Swin-B rows (mmseg `upernet_swin` + the Swin-B 22k 384 row:
# window 12, drop-path 0.3). `model.remat` 'full' checkpoints every block (nn.remat).
CONFIG: dict = dict(swin=dict(variant="swin_base_w12", drop_path_rate=0.3))


def check_config(m: ml_collections.ConfigDict) -> None:
    """ConfigError (naming the key) for Swin settings that cannot work."""
    if m.swin.variant not in SWIN_VARIANTS:
        raise ConfigError(
            f"model.swin.variant={m.swin.variant!r} is not one of {', '.join(SWIN_VARIANTS)}"
        )
    check_block_encoder(m, "swin")


def build(m: ml_collections.ConfigDict, dtype: Dtype) -> SwinTransformer:
    """The SwinTransformer of `config.model.swin` (+ `model.remat`)."""
    return SwinTransformer(
        SWIN_VARIANTS[m.swin.variant],
        float(m.swin.drop_path_rate),
        dtype,
        remat=m.remat == "full",
    )


def out_width(m: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Widths of the four stage outputs (C, 2C, 4C, 8C)."""
    c = SWIN_VARIANTS[m.swin.variant].embed_dims
    return tuple(c * 2**i for i in range(4))


def size_multiple(m: ml_collections.ConfigDict) -> int:
    """Any crop works: the patch embedding, the windows and the merging pad as mmseg does."""
    del m
    return 1
