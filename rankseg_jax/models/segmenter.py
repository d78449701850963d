"""Segmenter = ViT encoder + decode head, built from a `config.model`.

`Segmenter.__call__` returns the head's dict (masks in k slots, topk, img_logits) that training
consumes. `encode_decode` is the reference's inference path: scatter the k slots into an
n_cls canvas filled with −100, then resize bilinearly to the input size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from configs import common
from rankseg_jax.models.heads import GTHead, MaskTransformerHead, RankSegHead
from rankseg_jax.models.layers import ATTENTION_IMPLS
from rankseg_jax.models.vit import REMAT_POLICIES, VisionTransformer

CANVAS_FILL = -100.0


def scatter_to_classes(masks: jax.Array, topk: jax.Array | None, n_cls: int) -> jax.Array:
    """Scatter slot logits (B, h, w, k) into (B, h, w, n_cls) filled with exactly −100.

    Slot j goes to channel topk[b, j]; negative ids (padded GT slots) are dropped. With
    topk None (baseline) the masks already are in class order and are returned as they are.
    """
    if topk is None:
        return masks
    ids = jnp.where(topk < 0, n_cls, topk)

    def one(m, idx):
        canvas = jnp.full(m.shape[:-1] + (n_cls,), CANVAS_FILL, m.dtype)
        return canvas.at[:, :, idx].set(m, mode="drop")

    return jax.vmap(one)(masks, ids)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (B, h, w, C) to (B, H, W, C) like torch bilinear with align_corners=False."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    shape = (x.shape[0], *size, x.shape[-1])
    return jax.image.resize(x, shape, method="linear", antialias=False)


class Segmenter(nn.Module):
    """ViT encoder + Segmenter head. images (B, H, W, 3), normalised, any H, W ≥ 16."""

    backbone: VisionTransformer
    decode_head: nn.Module
    n_cls: int

    def __call__(self, images: jax.Array, train: bool = False, gt_labels=None) -> dict:
        out = self.backbone(images, train)
        feats, backbone_cls = out if isinstance(out, tuple) else (out, None)
        return self.decode_head(feats, backbone_cls, train, gt_labels)

    def encode_decode(self, images: jax.Array, gt_labels=None) -> jax.Array:
        """Inference logits (B, H, W, n_cls) at the input size, float32 (−100 off the top-k)."""
        out = self(images, False, gt_labels)
        logits = scatter_to_classes(out["masks"].astype(jnp.float32), out["topk"], self.n_cls)
        return resize_bilinear(logits, images.shape[1:3])

    def class_scores(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image-level class scores (B, n_cls) float32 and the top-k ids (B, k) int32."""
        out = self(images, False)
        return out["img_logits"], out["topk"]


def _dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def create_model(model_config: ml_collections.ConfigDict) -> Segmenter:
    """Build the Segmenter described by `config.model` (sizes resolved by configs.common).

    Precision policy of `compute_dtype='bfloat16'`: params (and so optimizer state) stay
    float32; matmuls, convolutions and the residual stream run in bfloat16; GELU (computed in
    float32, rounded back), LayerNorm statistics and outputs, attention scores and softmax,
    RankSeg's image-level branch (pooled proj_dec, block 0, decoder_norm2, ml_fc) and its
    top-k, the cosine normalisation, `mask_norm`, the upsample before the loss and the losses
    are float32 (checked by tests/test_precision.py; benchmarks/README.md).
    """
    m = model_config
    dims = common.vit_dims(m)
    if m.attention_impl not in ATTENTION_IMPLS:
        raise common.ConfigError(f"model.attention_impl={m.attention_impl!r}: {ATTENTION_IMPLS}")
    if m.remat not in REMAT_POLICIES:
        raise common.ConfigError(f"model.remat={m.remat!r} is not one of {REMAT_POLICIES}")
    dtype = _dtype(m.compute_dtype)
    encoder = VisionTransformer(
        img_size=tuple(m.img_size),
        patch_size=m.patch_size,
        width=dims["width"],
        depth=dims["depth"],
        num_heads=dims["num_heads"],
        mlp_dim=dims["mlp_dim"],
        drop_path_rate=m.drop_path_rate,
        n_cls_tokens=m.n_cls if m.oce else 0,
        cls_start_layer=m.oce_start_layer if m.oce_start_layer >= 0 else dims["depth"] - 1,
        dtype=dtype,
        attention_impl=m.attention_impl,
        remat=m.remat,
    )
    head_kw = dict(
        n_cls=m.n_cls,
        width=dims["dec_width"],
        num_heads=dims["dec_heads"],
        mlp_dim=dims["dec_mlp_dim"],
        n_layers=dims["dec_layers"],
        dropout=m.dropout,
        drop_path_rate=m.dec_drop_path_rate,
        cls_from_backbone=bool(m.oce),
        dtype=dtype,
        attention_impl=m.attention_impl,
    )
    if m.head == "rankseg":
        head = RankSegHead(k=m.k, downsample=m.downsample, **head_kw)
    elif m.head == "mask":
        head = MaskTransformerHead(**head_kw)
    elif m.head == "gt":
        head = GTHead(k=m.k, **head_kw)
    else:
        raise common.ConfigError(f"model.head={m.head!r} is not one of {common.HEADS}")
    return Segmenter(backbone=encoder, decode_head=head, n_cls=m.n_cls)
