"""Conv decode heads of mmseg (ASPP, FCN) and the RankSeg classifier for any per-pixel head.

Every decode head returns the dict the Segmenter heads return (rankseg_jax/models/heads.py):
  masks       (B, h, w, k)  slot logits at feature resolution (baseline: k = n_cls, class order)
  topk        (B, k) int32  class id of each slot in rank order (baseline: None)
  img_logits  (B, n_cls)    image-level class scores, float32 (RankSeg only)
The n_cls canvas filled with −100 is `segmenter.scatter_to_classes` (inference only).

* `ASPPHead` (DeepLabV3): image pooling branch (global average → 1×1 ConvModule → bilinear
  back, a broadcast), a 1×1 and dilated 3×3 ConvModules, concatenated, 3×3 `bottleneck`; then
  either mmseg's `conv_seg` (Dropout2d → 1×1 conv) or the RankSeg classifier.
* `FCNHead`: the auxiliary head (num_convs 3×3 ConvModules, no concat, Dropout2d, conv_seg).
* `rankseg_classify`: the official `ASPPRankSegHead` / `UPerRankSegHead` classifier, written as a
  function that runs inside the calling head's compact method so its params sit directly
  under the head (`cls_emb`, `cls_bias_emb`, `img_cls_head`, `norm`: the mmseg names). Any head
  that ends in a per-pixel feature map (B, h, w, C) can call it.
* `RankSegEncoderHead`: the image-level head (adaptive pool → depthwise-separable 1×1
  projection → one transformer block over [tokens, class embeddings] → LayerNorm →
  group-wise linear → (B, n_cls)).

Registry plumbing shared by every conv decode-head component (models/aspp.py; UperNet's the
same way): `CONV_HEAD_CONFIG` (the `config.model` keys `conv_head` and `rankseg_img_head`),
`check_conv_head`, `rankseg_settings` (the classifier → the heads' `rankseg` field) and
`build_aux` (the FCN auxiliary head).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rankseg_jax.errors import ConfigError
from rankseg_jax.models.conv import CONV_SEG_INIT, Conv2d, ConvModule, DepthwiseSeparableConvModule
from rankseg_jax.models.heads import GroupWiseLinear, adaptive_avg_pool, flatten
from rankseg_jax.models.layers import DecoderBlock, layer_norm

Dtype = Any

_HIGHEST = jax.lax.Precision.HIGHEST

# `config.model` keys of the conv decode heads (defaults: the full-size DeepLabV3 R101-d8 +
# RankSeg of the official fork; UperNet recipes set theirs). Dropout2d before the classifier
# is `model.dropout`; the auxiliary loss weight is `loss.aux_weight`.
CONV_HEAD_CONFIG: dict[str, Any] = dict(
    conv_head=dict(
        channels=512,  # decode-head width (= the RankSeg hidden size)
        auxiliary=True,  # FCN auxiliary head (training only)
        aux_channels=256,
        aux_in_index=2,  # stage 3 of the backbone
        aux_num_convs=1,
    ),
    rankseg_img_head=dict(
        n_heads=8,
        d_ff=2048,
        dropout=0.1,
        downsample=16,  # adaptive pool of the image-level input; 0 = none
        share_embedding=True,  # class embeddings shared with the pixel classifier
    ),
)
# torch trunc_normal_(std=0.02) with absolute ±2 bounds: effectively N(0, 0.02²).
EMB_INIT = nn.initializers.normal(0.02)


def dropout2d(module: nn.Module, rate: float, x: jax.Array, train: bool, name: str) -> jax.Array:
    """torch Dropout2d on NHWC: whole channels dropped per image (rng 'dropout')."""
    if rate == 0.0:
        return x
    return nn.Dropout(rate, broadcast_dims=(1, 2), name=name, parent=module)(x, not train)


class RankSegEncoderHead(nn.Module):
    """RankSeg's image-level multi-label head (official `RankSegEncoderHead`).

    x (B, h, w, d_encoder), the decode head's lowest-resolution input; class embeddings
    (n_cls, hidden) shared with the pixel classifier (`share_embedding`) or its own `cls_emb`.
    Returns float32 scores (B, n_cls). Runs in float32 (the image-level branch is small and
    its top-k decides the classes).
    """

    n_cls: int
    hidden: int
    n_heads: int
    d_ff: int
    dropout: float = 0.1
    downsample: int | None = 16
    share_embedding: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, cls_emb: jax.Array | None, train: bool) -> jax.Array:
        x = x.astype(jnp.float32)
        if not self.share_embedding:
            cls_emb = self.param("cls_emb", EMB_INIT, (1, self.n_cls, self.hidden))[0]
        if self.downsample:
            x = adaptive_avg_pool(x, self.downsample)
        x = DepthwiseSeparableConvModule(self.hidden, 1, name="proj_dec")(x, train)
        tokens = flatten(x)
        classes = jnp.broadcast_to(cls_emb[None], (x.shape[0], *cls_emb.shape))
        seq = jnp.concatenate([tokens, classes.astype(jnp.float32)], axis=1)
        block = DecoderBlock(
            self.n_heads, self.d_ff, self.dropout, attention_impl="xla", name="block"
        )
        seq = block(seq, not train)
        out = layer_norm(1e-5, "norm")(seq[:, -self.n_cls :])
        return GroupWiseLinear(self.n_cls, self.hidden, name="fc")(out)


def rankseg_classify(
    head: nn.Module,
    feats: jax.Array,
    img_input: jax.Array,
    *,
    n_cls: int,
    k: int,
    img_head: dict,
    dropout: float,
    train: bool,
) -> dict:
    """The RankSeg pixel classifier, run inside `head`'s compact method (params under `head`).

    feats (B, h, w, C): the decode head's per-pixel features (C = hidden); img_input
    (B, h', w', d_encoder): what the image-level head sees. img_head: RankSegEncoderHead fields
    (hidden, n_heads, d_ff, dropout, downsample, share_embedding). Steps: image scores →
    static top-k (rank order, as torch.argsort descending) → Dropout2d(feats) · selected
    embeddings + selected bias → LayerNorm over the k slots. Returns masks (B, h, w, k) float32,
    topk (B, k) int32, img_logits (B, n_cls) float32.
    """
    hidden = int(img_head["hidden"])
    cls_emb = head.param("cls_emb", EMB_INIT, (1, n_cls, hidden))
    cls_bias = head.param("cls_bias_emb", EMB_INIT, (1, n_cls))
    encoder = RankSegEncoderHead(
        n_cls,
        hidden,
        int(img_head["n_heads"]),
        int(img_head["d_ff"]),
        float(img_head.get("dropout", 0.1)),
        img_head.get("downsample", 16),
        bool(img_head.get("share_embedding", True)),
        name="img_cls_head",
        parent=head,
    )
    shared = cls_emb[0] if encoder.share_embedding else None
    img_logits = encoder(img_input, shared, train)
    _, topk = jax.lax.top_k(jax.lax.stop_gradient(img_logits), k)
    topk = topk.astype(jnp.int32)
    x = dropout2d(head, dropout, feats, train, "dropout").astype(jnp.float32)
    emb = jnp.take(cls_emb[0], topk, axis=0)  # (B, k, C)
    bias = jnp.take(cls_bias[0], topk, axis=0)  # (B, k)
    logits = jnp.einsum("bhwc,bkc->bhwk", x, emb, precision=_HIGHEST) + bias[:, None, None, :]
    masks = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm", parent=head)(logits)
    return {"masks": masks, "topk": topk, "img_logits": img_logits}


def conv_seg(
    head: nn.Module, feats: jax.Array, n_cls: int, dropout: float, train: bool
) -> jax.Array:
    """mmseg BaseDecodeHead.cls_seg: Dropout2d → 1×1 conv (bias) → (B, h, w, n_cls) float32."""
    x = dropout2d(head, dropout, feats, train, "dropout")
    conv = Conv2d(n_cls, 1, kernel_init=CONV_SEG_INIT, name="conv_seg", parent=head)
    return conv(x.astype(jnp.float32)).astype(jnp.float32)


class ASPPHead(nn.Module):
    """mmseg ASPPHead (DeepLabV3) on the last backbone output, optionally with RankSeg.

    rankseg: None for the baseline (`conv_seg`), else dict(k, img_head=dict(...)).
    Input: the backbone outputs; uses `in_index` (the last). Output: see the module docstring.
    """

    n_cls: int
    channels: int
    dilations: tuple[int, ...] = (1, 12, 24, 36)
    dropout: float = 0.1
    rankseg: dict | None = None
    in_index: int = -1
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, inputs: tuple[jax.Array, ...], train: bool) -> dict:
        x = inputs[self.in_index]
        kw = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        pooled = ConvModule(self.channels, 1, name="image_pool_1", **kw)(pooled, train)
        outs = [jnp.broadcast_to(pooled, (*x.shape[:3], self.channels))]
        for i, d in enumerate(self.dilations):
            size, pad = (1, 0) if d == 1 else (3, d)
            module = ConvModule(
                self.channels, size, padding=pad, dilation=d, name=f"aspp_modules_{i}", **kw
            )
            outs.append(module(x, train))
        feats = ConvModule(self.channels, 3, padding=1, name="bottleneck", **kw)(
            jnp.concatenate(outs, axis=-1), train
        )
        if self.rankseg is None:
            masks = conv_seg(self, feats, self.n_cls, self.dropout, train)
            return {"masks": masks, "topk": None, "img_logits": None}
        return rankseg_classify(
            self,
            feats,
            x,
            n_cls=self.n_cls,
            k=int(self.rankseg["k"]),
            img_head=dict(self.rankseg["img_head"]),
            dropout=self.dropout,
            train=train,
        )


class FCNHead(nn.Module):
    """mmseg FCNHead as the auxiliary head: `num_convs` 3×3 ConvModules → conv_seg.

    inputs: the backbone outputs, uses `in_index` (stage 3 = 2). Returns (B, h, w, n_cls) f32.
    """

    n_cls: int
    channels: int
    num_convs: int = 1
    dropout: float = 0.1
    in_index: int = 2
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, inputs: tuple[jax.Array, ...], train: bool) -> jax.Array:
        x = inputs[self.in_index]
        for i in range(self.num_convs):
            x = ConvModule(
                self.channels,
                3,
                padding=1,
                dtype=self.dtype,
                bn_axis_name=self.bn_axis_name,
                name=f"convs_{i}",
            )(x, train)
        return conv_seg(self, x, self.n_cls, self.dropout, train)


def check_conv_head(m: Any) -> None:
    """ConfigError (naming the key) for conv-head settings that cannot work."""
    if m.classifier not in ("full", "rankseg"):
        raise ConfigError(
            f"model.classifier={m.classifier!r}: the {m.decode_head} head has 'full' or 'rankseg'"
        )
    h, r = m.conv_head, m.rankseg_img_head
    for key in ("channels", "aux_channels", "aux_num_convs"):
        if h[key] < 1:
            raise ConfigError(f"model.conv_head.{key}={h[key]} must be at least 1")
    if m.classifier == "rankseg" and h.channels % r.n_heads:
        raise ConfigError(
            f"model.rankseg_img_head.n_heads={r.n_heads} must divide "
            f"model.conv_head.channels={h.channels}"
        )
    if r.downsample < 0:
        raise ConfigError(f"model.rankseg_img_head.downsample={r.downsample} must be ≥ 0")


def rankseg_settings(m: Any) -> dict | None:
    """The heads' `rankseg` field for `config.model`: None (classifier 'full') or dict(k,
    img_head) with the image-level head as wide as the decode head (hidden = channels)."""
    if m.classifier != "rankseg":
        return None
    r = m.rankseg_img_head
    img_head = dict(
        hidden=int(m.conv_head.channels),
        n_heads=int(r.n_heads),
        d_ff=int(r.d_ff),
        dropout=float(r.dropout),
        downsample=int(r.downsample) or None,
        share_embedding=bool(r.share_embedding),
    )
    return dict(k=int(m.k), img_head=img_head)


def build_aux(m: Any, in_width: Any, dtype: Dtype) -> FCNHead | None:
    """The FCN auxiliary head of `config.model` (None when `conv_head.auxiliary` is off)."""
    h = m.conv_head
    if not h.auxiliary:
        return None
    return FCNHead(
        m.n_cls,
        int(h.aux_channels),
        num_convs=int(h.aux_num_convs),
        dropout=float(m.dropout),
        in_index=int(h.aux_in_index),
        dtype=dtype,
    )
