"""Registry component `aspp`: DeepLabV3's ASPP decode head (+ FCN auxiliary head) ± RankSeg.

`config.model.decode_head='aspp'` with a multi-level encoder (e.g. `resnet`); the modules are
models/conv_heads.py's `ASPPHead` / `FCNHead`, so the parameter names are mmseg's
(`decode_head/aspp_modules_1/conv/...`, `auxiliary_head/convs_0/...`) and the mmseg `.pth`
interop of convert/mmseg_conv.py applies (`STATE_DICT`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from rankseg_jax.convert import mmseg_conv
from rankseg_jax.errors import ConfigError
from rankseg_jax.models.conv_heads import (
    CONV_HEAD_CONFIG,
    ASPPHead,
    build_aux,
    check_conv_head,
    rankseg_settings,
)

Dtype = Any

CONFIG: dict[str, Any] = dict(
    **CONV_HEAD_CONFIG,
    aspp=dict(dilations=(1, 12, 24, 36)),  # mmseg deeplabv3_r50-d8.py
)
STATE_DICT = mmseg_conv  # mmseg state dict ⇄ variables (params + batch_stats)
__all__ = ["CONFIG", "STATE_DICT", "build", "build_aux", "check_config"]


def check_config(m: ml_collections.ConfigDict) -> None:
    """ConfigError (naming the key) for ASPP settings that cannot work."""
    check_conv_head(m)
    if any(d < 1 for d in m.aspp.dilations):
        raise ConfigError(f"model.aspp.dilations={tuple(m.aspp.dilations)} must be ≥ 1")


def build(m: ml_collections.ConfigDict, in_width: tuple[int, ...], dtype: Dtype) -> ASPPHead:
    """The ASPP head on the last encoder output (`in_width`: the encoder's stage widths)."""
    del in_width  # convolutions infer their input width
    return ASPPHead(
        m.n_cls,
        int(m.conv_head.channels),
        tuple(int(d) for d in m.aspp.dilations),
        float(m.dropout),
        rankseg_settings(m),
        dtype=dtype,
    )
