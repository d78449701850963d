"""Where a model is composed: `config.model.encoder` + `.decode_head` + `.classifier`.

Component contract (what a new backbone or head module provides; then add ONE line below):

    CONFIG: dict           the `config.model` keys the component reads, with defaults. They
                           are merged into the config schema (rankseg_jax.config); a key two
                           components share must have the same default. A new family should
                           keep its keys prefixed or nested (e.g. `resnet=dict(depth=50)`).
    check_config(m)        raise errors.ConfigError (one line naming the key) for settings
                           that cannot work; runs in config.validate, before anything compiles.
    build(m, dtype)        encoders: a flax Module, `module(images (B, H, W, 3), train)` →
                           features (B, h, w, C), or (features, class tokens (B, n_cls, C)).
    out_width(m)           encoders: C (or a tuple of widths, for multi-level heads).
    build(m, in_width, dtype)
                           decode heads: a flax Module, `module(feats, cls_tokens, train,
                           gt_labels)` → {"masks": (B, h, w, k), "topk": (B, k) int32 or
                           None, "img_logits": (B, n_cls) float32 or absent}; the
                           `classifier` decides k and topk (full: k = n_cls, topk None;
                           rankseg: image-level top-k; gt: the label's classes). An
                           auxiliary head adds "aux_masks" (B, h, w, n_cls).

BatchNorm families: a component may use `batch_stats`; the train state keeps every non-param
collection in `TrainState.model_state` (empty for Segmenter), so no other file changes.
Today's Segmenter (vit + mask_transformer) keeps its parameter names: `backbone/...`,
`decode_head/...` (checkpoints and the mmseg/PyTorch interop depend on them).
"""

from __future__ import annotations

import types
from typing import Any

from rankseg_jax.models import heads, vit

ENCODERS: dict[str, types.ModuleType] = {
    "vit": vit,
}
DECODE_HEADS: dict[str, types.ModuleType] = {
    "mask_transformer": heads,
}
CLASSIFIERS = ("full", "rankseg", "gt")


def config_defaults() -> dict[str, Any]:
    """Every component's CONFIG keys, merged (the `model` part of the config schema)."""
    merged: dict[str, Any] = {}
    for component in (*ENCODERS.values(), *DECODE_HEADS.values()):
        for key, value in component.CONFIG.items():
            if key in merged and merged[key] != value:
                raise ValueError(f"model.{key}: components disagree on its default")
            merged[key] = value
    return merged
