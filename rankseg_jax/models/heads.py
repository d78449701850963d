"""Segmenter decode heads: the mask transformer (baseline), RankSeg and the GT-oracle head.

All heads take the encoder map (B, h, w, D_enc) and return a dict:
  masks       (B, h, w, k)  per-slot mask logits (baseline: k = n_cls, in class order)
  topk        (B, k) int32  class id of each slot, in rank order (baseline: None)
  img_logits  (B, n_cls)    image-level class scores, float32 (RankSeg only)
Scattering into an n_cls canvas is `segmenter.scatter_to_classes` (inference only).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rankseg_jax.errors import ConfigError
from rankseg_jax.models.layers import DecoderBlock, DenseAt, Dtype, layer_norm

# The `config.model` keys the mask-transformer head reads (registry contract); 0 means
# "from the encoder": width = encoder width, heads = width / 64, mlp = 4 * width.
CONFIG: dict[str, Any] = dict(
    dec_width=0,
    dec_layers=3,
    dec_heads=0,
    dec_mlp_dim=0,
    dec_drop_path_rate=0.0,
    dropout=0.1,
    downsample=8,  # RankSeg: the image-level branch pools the patch tokens to 8 × 8
)

_HIGHEST = jax.lax.Precision.HIGHEST


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights of torch AdaptiveAvgPool: bin i = [⌊i·n/o⌋, ⌈(i+1)·n/o⌉)."""
    weights = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """AdaptiveAvgPool2d(size) on (B, h, w, D) → (B, size, size, D), exact bins for any h, w."""
    ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], size))
    pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], size))
    x32 = x.astype(jnp.float32)
    return jnp.einsum("ih,jw,bhwd->bijd", ph, pw, x32, precision=_HIGHEST).astype(x.dtype)


def flatten(feats: jax.Array) -> jax.Array:
    """(B, h, w, C) → tokens (B, h·w, C), row-major like torch's NCHW flatten."""
    b, h, w, c = feats.shape
    return feats.reshape(b, h * w, c)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ‖x‖ along the last axis in float32, with no epsilon (as the reference)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def masked_layer_norm(x, valid, scale, bias, eps=1e-5):
    """SelectedLayerNorm of the GT head over the valid slots of (B, N, k), unbiased variance.

    Slot j uses scale[j], bias[j] by position; with a single valid slot the output is bias alone.
    """
    n = valid.sum(-1, keepdims=True).astype(jnp.float32)[:, None, :]  # (B, 1, 1)
    v = valid[:, None, :]
    mean = jnp.where(v, x, 0.0).sum(-1, keepdims=True) / n
    var = jnp.where(v, (x - mean) ** 2, 0.0).sum(-1, keepdims=True) / jnp.maximum(n - 1, 1)
    out = (x - mean) / jnp.sqrt(var + eps) * scale + bias
    return jnp.where(n > 1, out, jnp.broadcast_to(bias, out.shape))


class _MaskDecoderBase(nn.Module):
    """Shared parts: proj_dec, decoder blocks, the cosine-similarity mask readout."""

    n_cls: int
    width: int
    num_heads: int
    mlp_dim: int
    n_layers: int
    dropout: float = 0.1
    drop_path_rate: float = 0.0
    cls_from_backbone: bool = False
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    def block(self, j: int, dtype: Dtype | None = None) -> DecoderBlock:
        rate = self.drop_path_rate * j / max(self.n_layers - 1, 1)
        return DecoderBlock(
            self.num_heads, self.mlp_dim, self.dropout, rate, dtype or self.dtype,
            self.attention_impl, name=f"blocks_{j}",
        )  # fmt: skip

    def proj_dec(self) -> DenseAt:
        return DenseAt(self.width, name="proj_dec")

    def class_embedding(self, batch: int, backbone_cls: jax.Array | None) -> jax.Array:
        if self.cls_from_backbone:
            return backbone_cls
        emb = self.param(
            "cls_emb", nn.initializers.normal(0.02), (1, self.n_cls, self.width), jnp.float32
        )
        return jnp.broadcast_to(emb, (batch, self.n_cls, self.width))

    def cosine_masks(self, patches: jax.Array, classes: jax.Array) -> jax.Array:
        """decoder_norm'd patches (B, N, D), classes (B, K, D) → cosine scores (B, N, K) f32."""
        init = nn.initializers.normal(self.width**-0.5)
        p_patch = self.param("proj_patch", init, (self.width, self.width), jnp.float32)
        p_cls = self.param("proj_classes", init, (self.width, self.width), jnp.float32)
        patches = l2_normalize(jnp.matmul(patches, p_patch.astype(self.dtype)))
        classes = l2_normalize(jnp.matmul(classes, p_cls.astype(self.dtype)))
        return jnp.einsum("bnd,bkd->bnk", patches, classes)


class MaskTransformerHead(_MaskDecoderBase):
    """Segmenter's baseline head (spec 2.2): n_cls class tokens decoded with the patch tokens."""

    @nn.compact
    def __call__(self, feats, backbone_cls=None, train: bool = False, gt_labels=None) -> dict:
        b, h, w, _ = feats.shape
        x = self.proj_dec()(flatten(feats), self.dtype)
        x = jnp.concatenate([x, self.class_embedding(b, backbone_cls).astype(x.dtype)], axis=1)
        for j in range(self.n_layers):
            x = self.block(j)(x, not train)
        x = layer_norm(1e-5, "decoder_norm")(x)
        masks = self.cosine_masks(x[:, : h * w], x[:, h * w :])
        masks = layer_norm(1e-5, "mask_norm")(masks)
        return dict(masks=masks.reshape(b, h, w, self.n_cls), topk=None, img_logits=None)


class GroupWiseLinear(nn.Module):
    """A separate linear classifier per class token: (B, n_cls, D) → (B, n_cls)."""

    n_cls: int
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bound = self.width**-0.5
        init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        weight = self.param("W", init, (1, self.n_cls, self.width))
        bias = self.param("b", init, (1, self.n_cls))
        return jnp.sum(weight * x.astype(jnp.float32), axis=-1) + bias


class RankSegHead(_MaskDecoderBase):
    """Segmenter + RankSeg (spec 2.3): image-level class scores pick k classes per image.

    Block 0 runs on [8×8 pooled tokens, n_cls class tokens] and feeds `ml_fc`; the top-k
    normalised class tokens (static k, ties to the lower class id, float32) are then decoded
    with the full-resolution pixel tokens; `mask_norm` is a LayerNorm over the k rank slots.
    The image-level branch (pooled proj_dec, block 0, decoder_norm2, ml_fc) always computes in
    float32: it is ~1 % of the step's FLOPs, and bf16 rounding there flips near-tied ranks at
    the k boundary (tests/test_precision.py measures how often).
    """

    k: int = 50
    downsample: int = 8

    @nn.compact
    def __call__(self, feats, backbone_cls=None, train: bool = False, gt_labels=None) -> dict:
        b, h, w, _ = feats.shape
        proj_dec = self.proj_dec()
        pooled = proj_dec(flatten(adaptive_avg_pool(feats, self.downsample)), jnp.float32)
        pixels = proj_dec(flatten(feats), self.dtype)
        cls = self.class_embedding(b, backbone_cls).astype(jnp.float32)
        seq = self.block(0, jnp.float32)(jnp.concatenate([pooled, cls], axis=1), not train)
        cls_ml = layer_norm(1e-5, "decoder_norm2")(seq[:, -self.n_cls :])
        img_logits = GroupWiseLinear(self.n_cls, self.width, name="ml_fc")(cls_ml)
        _, topk = jax.lax.top_k(jax.lax.stop_gradient(img_logits), self.k)
        cls_topk = jnp.take_along_axis(cls_ml, topk[:, :, None], axis=1)
        x = jnp.concatenate([pixels, cls_topk.astype(pixels.dtype)], axis=1)
        for j in range(1, self.n_layers):
            x = self.block(j)(x, not train)
        x = layer_norm(1e-5, "decoder_norm")(x)
        masks = layer_norm(1e-5, "mask_norm")(self.cosine_masks(x[:, : h * w], x[:, h * w :]))
        return dict(
            masks=masks.reshape(b, h, w, self.k), topk=topk.astype(jnp.int32), img_logits=img_logits
        )


def gt_class_slots(labels: jax.Array, n_cls: int, k: int) -> tuple[jax.Array, jax.Array]:
    """Classes present in each label map, ascending, padded to a static k.

    labels (B, H, W) int (values ≥ n_cls, e.g. ignore, are not classes) → ids (B, k) int32 with
    −1 in padded slots, valid (B, k) bool. An image without any class uses class 0, as the
    reference does. Images with more than k classes keep the k lowest ids.
    """
    onehot = jax.nn.one_hot(labels.reshape(labels.shape[0], -1), n_cls, dtype=jnp.int32)
    present = onehot.sum(1) > 0
    present = present.at[:, 0].set(present[:, 0] | ~present.any(-1))
    key = jnp.where(present, n_cls - jnp.arange(n_cls), 0).astype(jnp.float32)
    score, ids = jax.lax.top_k(key, k)
    valid = score > 0
    return jnp.where(valid, ids, -1).astype(jnp.int32), valid


class SelectedLayerNorm(nn.Module):
    """The GT head's `mask_norm`: per-position scale/bias of size n_cls, used for k ≤ n_cls."""

    n_cls: int

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        k = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (self.n_cls,))[:k]
        bias = self.param("bias", nn.initializers.zeros, (self.n_cls,))[:k]
        return masked_layer_norm(x, valid, scale, bias)


class GTHead(_MaskDecoderBase):
    """GT-oracle head (spec 2.5): the label's class set instead of a predicted top-k.

    Needs the label map of the image (B, H, W) at train *and* test time (`gt_labels`; in slide
    inference the whole image's label for every window). Padded slots are masked out as keys in
    every block and in `mask_norm`, and get −100 in the returned masks.
    """

    k: int = 150

    @nn.compact
    def __call__(self, feats, backbone_cls=None, train: bool = False, gt_labels=None) -> dict:
        if gt_labels is None:
            raise ValueError("the GT head needs gt_labels (B, H, W): it reads the class set")
        b, h, w, _ = feats.shape
        ids, valid = gt_class_slots(gt_labels, self.n_cls, self.k)
        cls = jnp.take(self.class_embedding(b, None)[0], jnp.maximum(ids, 0), axis=0)
        x = self.proj_dec()(flatten(feats), self.dtype)
        x = jnp.concatenate([x, cls.astype(x.dtype)], axis=1)
        key_mask = jnp.concatenate([jnp.ones((b, h * w), bool), valid], axis=1)
        for j in range(self.n_layers):
            x = self.block(j)(x, not train, key_mask)
        x = layer_norm(1e-5, "decoder_norm")(x)
        scores = self.cosine_masks(x[:, : h * w], x[:, h * w :])
        masks = SelectedLayerNorm(self.n_cls, name="mask_norm")(scores, valid)
        masks = jnp.where(valid[:, None, :], masks, -100.0)
        return dict(masks=masks.reshape(b, h, w, self.k), topk=ids, img_logits=None)


def decoder_dims(m: ml_collections.ConfigDict, in_width: int) -> dict[str, int]:
    """Resolved decoder sizes of `config.model` for an encoder of `in_width` channels."""
    width = m.dec_width or in_width
    return dict(
        width=width,
        n_layers=m.dec_layers,
        num_heads=m.dec_heads or max(width // 64, 1),
        mlp_dim=m.dec_mlp_dim or 4 * width,
    )


def check_config(m: ml_collections.ConfigDict) -> None:
    """Raise ConfigError (naming the key) for head settings that cannot work."""
    if m.dec_layers < 1:
        raise ConfigError(f"model.dec_layers={m.dec_layers} must be at least 1")


def build(m: ml_collections.ConfigDict, in_width: int, dtype: Dtype) -> nn.Module:
    """The head of `config.model` for its classifier (full, rankseg or gt)."""
    kw = dict(
        n_cls=m.n_cls,
        dropout=m.dropout,
        drop_path_rate=m.dec_drop_path_rate,
        cls_from_backbone=bool(m.oce),
        dtype=dtype,
        attention_impl=m.attention_impl,
        **decoder_dims(m, in_width),
    )
    if m.classifier == "rankseg":
        return RankSegHead(k=m.k, downsample=m.downsample, **kw)
    if m.classifier == "gt":
        return GTHead(k=m.k, **kw)
    return MaskTransformerHead(**kw)
