"""UperNet (mmseg `UPerHead` + FCN auxiliary head) on Swin or BEiT, with or without RankSeg.

`UPerHead` (mmseg, the fork's version with the in-place sum written out, README F5):
- PPM on the last input: per pool scale s ∈ (1, 2, 3, 6) AdaptiveAvgPool(s) → 1×1 ConvModule →
  bilinear back to the input size; [x, ppm…] concatenated → 3×3 ConvModule `bottleneck`;
- 1×1 lateral ConvModules on the other inputs, the PPM output as the top lateral;
- top-down: lateral[i−1] + bilinear(lateral[i]) from the top;
- 3×3 `fpn_convs` on every lateral but the top, all levels resized to the finest and
  concatenated → 3×3 ConvModule `fpn_bottleneck` (B, h/4, w/4, channels);
- then mmseg's `conv_seg` (baseline) or, for `UPerRankSegHead` (fork commit fb7a30f, README F3),
  the RankSeg classifier of models/conv_heads.py with the image-level head on the **last**
  (lowest-resolution) backbone output.

Bilinear resizes are torch's with align_corners=False (`segmenter.resize_bilinear`). The model
returns the dict of models/deeplab.py (masks, topk, img_logits, aux_masks, features).

Registry component `uper` (decode head, models/registry.py): `CONFIG` (the shared conv-head
keys + `uper.pool_scales`), `check_config`, `build`, `build_aux` (the FCN auxiliary head on
`conv_head.aux_in_index`), `STATE_DICT` (convert/mmseg_upernet.py). With the `swin` / `beit`
encoders it composes the same modules (and parameter names) as `upernet_swin` / `upernet_beit`
below, which the parity tests use.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rankseg_jax.convert import mmseg_upernet
from rankseg_jax.errors import ConfigError
from rankseg_jax.models.beit import BEIT_VARIANTS, BEiT
from rankseg_jax.models.conv import ConvModule
from rankseg_jax.models.conv_heads import (
    CONV_HEAD_CONFIG,
    FCNHead,
    build_aux,
    check_conv_head,
    conv_seg,
    rankseg_classify,
    rankseg_settings,
)
from rankseg_jax.models.heads import adaptive_avg_pool
from rankseg_jax.models.layers import resize_bilinear, scatter_to_classes
from rankseg_jax.models.swin import SWIN_VARIANTS, SwinTransformer

Dtype = Any

# Loss settings of the fb7a30f RankSeg rows (k 50, ASL γ− 2, γ+ 0): Swin ×10, BEiT ×5.
SWIN_RANKSEG_LOSS = dict(
    img_loss="asl",
    img_loss_weight=10.0,
    gamma_neg=2.0,
    gamma_pos=0.0,
    clip=0.05,
    eps=1e-5,
    seg_loss_weight=1.0,
)
BEIT_RANKSEG_LOSS = dict(SWIN_RANKSEG_LOSS, img_loss_weight=5.0)


class UPerHead(nn.Module):
    """mmseg UPerHead; inputs: the four backbone maps NHWC, fine to coarse.

    rankseg: None (baseline, `conv_seg`) or dict(k, img_head=dict(hidden, n_heads, d_ff,
    dropout, downsample, share_embedding)). Returns masks (B, h/4, w/4, n_cls | k) float32,
    topk, img_logits (see models/conv_heads.py).
    """

    n_cls: int
    channels: int
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    rankseg: dict | None = None
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, inputs: tuple[jax.Array, ...], train: bool) -> dict:
        kw = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name)
        c = self.channels
        top = inputs[-1]
        size = top.shape[1:3]
        psp = [top]
        for i, scale in enumerate(self.pool_scales):
            pooled = adaptive_avg_pool(top, scale)
            pooled = ConvModule(c, 1, name=f"psp_modules_{i}_1", **kw)(pooled, train)
            psp.append(resize_bilinear(pooled, size).astype(pooled.dtype))
        laterals = [
            ConvModule(c, 1, name=f"lateral_convs_{i}", **kw)(x, train)
            for i, x in enumerate(inputs[:-1])
        ]
        laterals.append(
            ConvModule(c, 3, padding=1, name="bottleneck", **kw)(jnp.concatenate(psp, -1), train)
        )
        for i in range(len(laterals) - 1, 0, -1):
            up = resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
            laterals[i - 1] = laterals[i - 1] + up.astype(laterals[i - 1].dtype)
        outs = [
            ConvModule(c, 3, padding=1, name=f"fpn_convs_{i}", **kw)(lat, train)
            for i, lat in enumerate(laterals[:-1])
        ]
        outs.append(laterals[-1])
        fine = outs[0].shape[1:3]
        outs = [outs[0]] + [resize_bilinear(o, fine).astype(o.dtype) for o in outs[1:]]
        feats = ConvModule(c, 3, padding=1, name="fpn_bottleneck", **kw)(
            jnp.concatenate(outs, -1), train
        )
        if self.rankseg is None:
            masks = conv_seg(self, feats, self.n_cls, self.dropout, train)
            return {"masks": masks, "topk": None, "img_logits": None}
        return rankseg_classify(
            self,
            feats,
            top,
            n_cls=self.n_cls,
            k=int(self.rankseg["k"]),
            img_head=dict(self.rankseg["img_head"]),
            dropout=self.dropout,
            train=train,
        )


class UperNet(nn.Module):
    """mmseg EncoderDecoder: backbone (Swin / BEiT) → UPerHead (+ FCN aux head in training).

    images (B, H, W, 3) normalised, NHWC. A train forward needs `mutable=['batch_stats']`
    (and rng 'dropout' when any dropout / drop-path is > 0). Output: masks, topk, img_logits,
    aux_masks (train only), features (the four backbone maps).
    """

    backbone: nn.Module
    decode_head: UPerHead
    auxiliary_head: FCNHead | None
    n_cls: int

    def __call__(self, images: jax.Array, train: bool = False) -> dict:
        feats = self.backbone(images, train)
        out = dict(self.decode_head(tuple(feats), train))
        aux = None
        if self.auxiliary_head is not None and (train or self.is_initializing()):
            aux = self.auxiliary_head(tuple(feats), train)
        out["aux_masks"] = aux if train else None
        out["features"] = feats
        return out

    def encode_decode(self, images: jax.Array) -> jax.Array:
        """Inference logits (B, H, W, n_cls) float32 at the input size (−100 off the top-k)."""
        return inference_logits(self(images, False), images.shape[1:3], self.n_cls)


def inference_logits(out: dict, size: tuple[int, int], n_cls: int) -> jax.Array:
    """Eval outputs → (B, H, W, n_cls) float32 logits at `size`: RankSeg slots scattered into
    the −100 canvas, then torch bilinear (align_corners=False)."""
    logits = out["masks"].astype(jnp.float32)
    if out["topk"] is not None:
        logits = scatter_to_classes(logits, out["topk"], n_cls)
    return resize_bilinear(logits, size)


def _rankseg(head: str, k: int, img_head: dict) -> dict | None:
    if head not in ("rankseg", "base"):
        raise ValueError(f"upernet head={head!r}: 'rankseg' or 'base'")
    return dict(k=k, img_head=img_head) if head == "rankseg" else None


def upernet_swin(
    n_cls: int = 150,
    head: str = "rankseg",
    *,
    variant: str = "swin_base_w12",
    channels: int = 512,
    aux_channels: int = 256,
    drop_path_rate: float = 0.3,
    dropout: float = 0.1,
    img_dropout: float = 0.1,
    k: int = 50,
    img_heads: int = 8,
    img_d_ff: int = 2048,
    auxiliary: bool = True,
    remat: bool = False,
    dtype: Dtype = jnp.float32,
    bn_axis_name: str | None = None,
) -> UperNet:
    """UperNet Swin (+ RankSeg as the fb7a30f Swin row: shared embeddings, no pooling, hidden =
    UperNet channels, d_encoder = last stage width). Defaults: the full-size Swin-B row
    (mmseg `upernet_swin.py` base: channels 512, aux 256 on stage 3, drop-path 0.3).
    """
    kw = dict(dtype=dtype, bn_axis_name=bn_axis_name)
    img_head = dict(
        hidden=channels,
        n_heads=img_heads,
        d_ff=img_d_ff,
        dropout=img_dropout,
        downsample=None,
        share_embedding=True,
    )
    return UperNet(
        backbone=SwinTransformer(SWIN_VARIANTS[variant], drop_path_rate, dtype, remat),
        decode_head=UPerHead(
            n_cls, channels, dropout=dropout, rankseg=_rankseg(head, k, img_head), **kw
        ),
        auxiliary_head=(
            FCNHead(n_cls, aux_channels, dropout=dropout, in_index=2, **kw) if auxiliary else None
        ),
        n_cls=n_cls,
    )


def upernet_beit(
    n_cls: int = 150,
    head: str = "rankseg",
    *,
    variant: str = "beit_large_640",
    channels: int = 1024,
    aux_channels: int = 256,
    drop_path_rate: float = 0.2,
    dropout: float = 0.1,
    img_dropout: float = 0.1,
    k: int = 50,
    img_heads: int = 16,
    img_d_ff: int = 4096,
    auxiliary: bool = True,
    remat: bool = False,
    dtype: Dtype = jnp.float32,
    bn_axis_name: str | None = None,
) -> UperNet:
    """UperNet BEiT (+ RankSeg as the fb7a30f BEiT row: own class embeddings in the image head,
    no pooling, hidden = UperNet channels, ASL ×5). Defaults: BEiT-L/16 640 (channels 1024).
    """
    kw = dict(dtype=dtype, bn_axis_name=bn_axis_name)
    img_head = dict(
        hidden=channels,
        n_heads=img_heads,
        d_ff=img_d_ff,
        dropout=img_dropout,
        downsample=None,
        share_embedding=False,
    )
    backbone = BEiT(BEIT_VARIANTS[variant], drop_path_rate, dtype, remat, bn_axis_name)
    return UperNet(
        backbone=backbone,
        decode_head=UPerHead(
            n_cls, channels, dropout=dropout, rankseg=_rankseg(head, k, img_head), **kw
        ),
        auxiliary_head=(
            FCNHead(n_cls, aux_channels, dropout=dropout, in_index=2, **kw) if auxiliary else None
        ),
        n_cls=n_cls,
    )


def small_upernet(
    backbone: str, head: str = "rankseg", n_cls: int = 150, **overrides: Any
) -> UperNet:
    """The family fixtures' small models (official_family README): channels 16, aux 8,
    image head hidden 16, 2 heads, d_ff 32; Swin embed 16 window 7, BEiT embed 32 depth 4.
    `overrides`: builder arguments (e.g. dropout=0 as the fixtures' train forward)."""
    small: dict[str, Any] = dict(channels=16, aux_channels=8, img_heads=2, img_d_ff=32)
    small.update(overrides)
    if backbone == "swin":
        return upernet_swin(n_cls, head, variant="swin_test", **small)
    if backbone == "beit":
        return upernet_beit(n_cls, head, variant="beit_test", **small)
    raise ValueError(f"small_upernet backbone={backbone!r}: 'swin' or 'beit'")


# --------------------------------------------------------------------------------------------
# Registry component `uper` (decode head)
# --------------------------------------------------------------------------------------------

# `config.model` keys: the shared conv-head keys (models/conv_heads.py: channels, auxiliary FCN
# head, RankSeg image-level head) and `uper.pool_scales` (mmseg UPerHead's PPM).
CONFIG: dict[str, Any] = dict(**CONV_HEAD_CONFIG, uper=dict(pool_scales=(1, 2, 3, 6)))
STATE_DICT = mmseg_upernet  # mmseg state dict ⇄ variables (+ relative position indices)
__all__ = [
    "CONFIG",
    "STATE_DICT",
    "UPerHead",
    "UperNet",
    "build",
    "build_aux",
    "check_config",
    "inference_logits",
    "small_upernet",
    "upernet_beit",
    "upernet_swin",
]


def check_config(m: ml_collections.ConfigDict) -> None:
    """ConfigError (naming the key) for UperNet head settings that cannot work."""
    check_conv_head(m)
    if not m.uper.pool_scales or min(m.uper.pool_scales) < 1:
        raise ConfigError(f"model.uper.pool_scales={tuple(m.uper.pool_scales)}: values ≥ 1")


def build(m: ml_collections.ConfigDict, in_width: tuple[int, ...], dtype: Dtype) -> UPerHead:
    """UPerHead over the encoder's four outputs; RankSeg's image head reads the last one."""
    if not isinstance(in_width, tuple):
        raise ConfigError(
            f"model.decode_head='uper' needs a multi-level encoder (swin, beit, resnet), "
            f"not model.encoder={m.encoder!r}"
        )
    return UPerHead(
        m.n_cls,
        int(m.conv_head.channels),
        tuple(int(s) for s in m.uper.pool_scales),
        float(m.dropout),
        rankseg_settings(m),
        dtype=dtype,
    )
