"""DeepLabV3 (ResNetV1c-d8 + ASPP, FCN auxiliary head) with or without RankSeg.

mmseg's `EncoderDecoder`: backbone → decode head (+ auxiliary head in training), BN with torch /
SyncBN semantics (rankseg_jax/models/conv.py). Variables: `params` and `batch_stats`; a train
forward must be applied with `mutable=['batch_stats']` (and an rng 'dropout' when dropout > 0).

The model is a multi-level `Segmenter` (models/segmenter.py), the one the config registry
builds from `encoder='resnet'`, `decode_head='aspp'` (configs/deeplabv3.py). Output dict (see
conv_heads): masks (B, h, w, k), topk, img_logits, plus `aux_masks` (B, h', w', n_cls) logits
of the auxiliary head (training only; None at eval) and `features` (the four backbone outputs,
NHWC). `encode_decode` gives inference logits at the input size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rankseg_jax import losses
from rankseg_jax.models.conv_heads import ASPPHead, FCNHead
from rankseg_jax.models.resnet import ResNetV1c
from rankseg_jax.models.segmenter import Segmenter

Dtype = Any

AUX_WEIGHT = 0.4
# The RankSeg COCO-Stuff10k config of the official fork (k 50, ASL γ− 2, γ+ 0, ×10).
RANKSEG_LOSS = dict(
    img_loss="asl",
    img_loss_weight=10.0,
    gamma_neg=2.0,
    gamma_pos=0.0,
    clip=0.05,
    eps=1e-5,
    seg_loss_weight=1.0,
)


# DeepLabV3 is a multi-level `Segmenter` (backbone, decode_head, auxiliary_head): the same
# module the config registry builds (encoder `resnet`, decode head `aspp`).
DeepLabV3 = Segmenter


def deeplabv3(
    n_cls: int,
    head: str = "rankseg",
    *,
    depth: int = 101,
    stage_blocks: tuple[int, ...] | None = None,
    stem_channels: int = 64,
    base_channels: int = 64,
    channels: int = 512,
    aux_channels: int = 256,
    dilations: tuple[int, ...] = (1, 12, 24, 36),
    dropout: float = 0.1,
    k: int = 50,
    img_hidden: int = 512,
    img_heads: int = 8,
    img_d_ff: int = 2048,
    img_dropout: float = 0.1,
    img_downsample: int | None = 16,
    auxiliary: bool = True,
    dtype: Dtype = jnp.float32,
    bn_axis_name: str | None = None,
) -> DeepLabV3:
    """Build DeepLabV3-R{depth}-d8, `head` 'rankseg' or 'base'.

    Defaults are the full-size model of the fork's `deeplabv3_mlseg_r101-d8_512x512_20k_
    coco-stuff10k.py` (hidden 512 = ASPP channels, 8 heads, d_ff 2048, downsample 16, shared
    embeddings, k 50) on mmseg's `deeplabv3_r50-d8.py` base (channels 512, aux 256, dilations
    (1, 12, 24, 36)). `small_deeplabv3` gives the fixtures' tiny model.
    """
    if head not in ("rankseg", "base"):
        raise ValueError(f"deeplabv3 head={head!r}: 'rankseg' or 'base'")
    if head == "rankseg" and img_hidden != channels:
        raise ValueError(f"RankSeg needs img_hidden == channels, got {img_hidden} and {channels}")
    kw = dict(dtype=dtype, bn_axis_name=bn_axis_name)
    rankseg = None
    if head == "rankseg":
        rankseg = dict(
            k=k,
            img_head=dict(
                hidden=img_hidden,
                n_heads=img_heads,
                d_ff=img_d_ff,
                dropout=img_dropout,
                downsample=img_downsample,
                share_embedding=True,
            ),
        )
    return DeepLabV3(
        backbone=ResNetV1c(depth, stem_channels, base_channels, stage_blocks=stage_blocks, **kw),
        decode_head=ASPPHead(n_cls, channels, tuple(dilations), dropout, rankseg, **kw),
        auxiliary_head=FCNHead(n_cls, aux_channels, dropout=dropout, **kw) if auxiliary else None,
        n_cls=n_cls,
        multi_level=True,
    )


def small_deeplabv3(n_cls: int = 171, head: str = "rankseg", **overrides: Any) -> DeepLabV3:
    """The official family fixtures' small model (ResNetV1c-50, stem 8, base 4, ASPP 16 ch)."""
    sizes: dict[str, Any] = dict(
        depth=50,
        stem_channels=8,
        base_channels=4,
        channels=16,
        aux_channels=8,
        img_hidden=16,
        img_heads=2,
        img_d_ff=32,
    )
    sizes.update(overrides)
    return deeplabv3(n_cls, head, **sizes)


def deeplab_loss_terms(
    outputs: Mapping[str, Any],
    labels: jax.Array,
    n_cls: int,
    loss_config: Mapping[str, Any] | None = None,
    aux_weight: float = AUX_WEIGHT,
    ignore_index: int = 255,
) -> losses.LossTerms:
    """The decode head's terms (`losses.loss_terms`: CE on slots/classes, ASL × weight, top-k
    metrics) plus `aux.loss_seg` (CE × aux_weight) and `aux.acc_seg` (`losses.with_aux_terms`,
    what training's `losses.segmentation_losses` adds); `loss` sums the losses.

    outputs: a train forward of DeepLabV3; labels (B, H, W) int.
    """
    cfg = RANKSEG_LOSS if loss_config is None else loss_config
    terms = losses.loss_terms(outputs, labels, cfg, n_cls, ignore_index)
    if outputs.get("aux_masks") is None:
        return terms
    return losses.with_aux_terms(terms, outputs["aux_masks"], labels, aux_weight)
