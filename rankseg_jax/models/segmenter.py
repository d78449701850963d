"""Segmenter = encoder + decode head, composed from `config.model` by the model registry.

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

from rankseg_jax.errors import ConfigError
from rankseg_jax.models import heads, registry, vit
from rankseg_jax.models.layers import (  # noqa: F401  (re-exported: the public names)
    ATTENTION_IMPLS,
    CANVAS_FILL,
    resize_bilinear,
    scatter_to_classes,
)


class Segmenter(nn.Module):
    """Encoder + decode head (+ auxiliary head). images (B, H, W, 3), normalised, H, W ≥ 16.

    `multi_level` (conv families: DeepLabV3, UperNet; see models/registry.py): the encoder
    returns its stage outputs (fine → coarse, NHWC), the heads are called as
    `head(features, train)`, the output also carries `features` and `aux_masks` (the
    auxiliary head's (B, h, w, n_cls) float32 logits in training, None at eval). Such models
    hold BatchNorm `batch_stats`: a train forward needs `mutable=['batch_stats']`.
    """

    backbone: nn.Module
    decode_head: nn.Module
    n_cls: int
    auxiliary_head: nn.Module | None = None
    multi_level: bool = False

    def __call__(self, images: jax.Array, train: bool = False, gt_labels=None) -> dict:
        out = self.backbone(images, train)
        if self.multi_level:
            feats = tuple(out)
            result = dict(self.decode_head(feats, train))
            aux = None
            if self.auxiliary_head is not None and (train or self.is_initializing()):
                aux = self.auxiliary_head(feats, train)  # created at init, run in training
            result["aux_masks"] = aux if train else None
            result["features"] = feats
            return result
        feats, backbone_cls = out if isinstance(out, tuple) else (out, None)
        return self.decode_head(feats, backbone_cls, train, gt_labels)

    def encode_decode(self, images: jax.Array, gt_labels=None) -> jax.Array:
        """Inference logits (B, H, W, n_cls) at the input size, float32 (−100 off the top-k)."""
        return self.encode_decode_with_scores(images, gt_labels)[0]

    def encode_decode_with_scores(
        self, images: jax.Array, gt_labels=None
    ) -> tuple[jax.Array, jax.Array]:
        """`encode_decode` and image-level class scores (B, n_cls) float32 of the same forward
        pass: RankSeg's sigmoid(img_logits), else the mean softmax probability of the pixels.
        """
        out = self(images, False, gt_labels)
        logits = scatter_to_classes(out["masks"].astype(jnp.float32), out["topk"], self.n_cls)
        logits = resize_bilinear(logits, images.shape[1:3])
        if out.get("img_logits") is not None:
            return logits, jax.nn.sigmoid(out["img_logits"].astype(jnp.float32))
        return logits, jax.nn.softmax(logits, axis=-1).mean(axis=(1, 2))

    def class_scores(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image-level class scores (B, n_cls) float32 and the top-k ids (B, k) int32."""
        out = self(images, False)
        return out["img_logits"], out["topk"]


def _dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def vit_dims(m: ml_collections.ConfigDict) -> dict[str, int]:
    """Resolved ViT encoder and mask-transformer decoder sizes of a Segmenter `config.model`
    (width, depth, num_heads, mlp_dim, dec_width, dec_layers, dec_heads, dec_mlp_dim)."""
    enc = vit.encoder_dims(m)
    dec = heads.decoder_dims(m, enc["width"])
    return dict(
        enc,
        dec_width=dec["width"],
        dec_layers=dec["n_layers"],
        dec_heads=dec["num_heads"],
        dec_mlp_dim=dec["mlp_dim"],
    )


def check_config(m: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for a `config.model` that cannot be built (names the key)."""
    for key, known in (
        ("encoder", registry.ENCODERS),
        ("decode_head", registry.DECODE_HEADS),
        ("classifier", registry.CLASSIFIERS),
    ):
        if m[key] not in known:
            raise ConfigError(f"model.{key}={m[key]!r} is not one of {', '.join(known)}")
    if m.attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl={m.attention_impl!r}: {ATTENTION_IMPLS}")
    if m.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.compute_dtype={m.compute_dtype!r}: float32 or bfloat16")
    if not 1 <= m.k <= m.n_cls:
        raise ConfigError(f"model.k={m.k} must be in 1..model.n_cls={m.n_cls}")
    registry.ENCODERS[m.encoder].check_config(m)
    registry.DECODE_HEADS[m.decode_head].check_config(m)


def create_model(model_config: ml_collections.ConfigDict) -> Segmenter:
    """Build the model described by `config.model` (components from the model registry).

    Precision policy of `compute_dtype='bfloat16'`: params (and so optimizer state) stay
    float32; matmuls, convolutions and the residual stream run in bfloat16; GELU (computed in
    float32, rounded back), LayerNorm statistics and outputs, attention scores and softmax,
    RankSeg's image-level branch (pooled proj_dec, block 0, decoder_norm2, ml_fc) and its
    top-k, the cosine normalisation, `mask_norm`, the upsample before the loss and the losses
    are float32 (checked by tests/test_precision.py; benchmarks/README.md).
    """
    m = model_config
    check_config(m)
    dtype = _dtype(m.compute_dtype)
    encoder = registry.ENCODERS[m.encoder]
    head_component = registry.DECODE_HEADS[m.decode_head]
    width = encoder.out_width(m)
    build_aux = getattr(head_component, "build_aux", None)
    return Segmenter(
        backbone=encoder.build(m, dtype),
        decode_head=head_component.build(m, width, dtype),
        n_cls=m.n_cls,
        auxiliary_head=build_aux(m, width, dtype) if build_aux else None,
        multi_level=isinstance(width, tuple),
    )
