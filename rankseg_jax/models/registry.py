"""Where a model is composed: `config.model.encoder` + `.decode_head` + `.classifier`.

Component contract (what a new backbone or head module provides; then add ONE line below):

    CONFIG: dict           the `config.model` keys the component reads, with defaults. They
                           are merged into the config schema (rankseg_jax.config); a key two
                           components share must have the same default. A new family should
                           keep its keys prefixed or nested (e.g. `resnet=dict(depth=50)`).
    check_config(m)        raise errors.ConfigError (one line naming the key) for settings
                           that cannot work; runs in config.validate, before anything compiles.
    build(m, dtype)        encoders: a flax Module, `module(images (B, H, W, 3), train)` →
                           features (B, h, w, C), or (features, class tokens (B, n_cls, C));
                           a multi-level encoder returns its stage outputs (fine → coarse).
    out_width(m)           encoders: C, or a tuple of the stage widths — a tuple makes the
                           model multi-level (conv-family heads, `Segmenter.multi_level`).
    size_multiple(m)       encoders: what training crops must be a multiple of (ViT: patch).
    build(m, in_width, dtype)
                           decode heads: a flax Module → {"masks": (B, h, w, k), "topk": (B, k)
                           int32 or None, "img_logits": (B, n_cls) float32 or None}; the
                           `classifier` decides k and topk (full: k = n_cls, topk None;
                           rankseg: image-level top-k; gt: the label's classes). Called as
                           `module(feats, cls_tokens, train, gt_labels)`, or, after a
                           multi-level encoder, `module(stage_outputs, train)`.
    build_aux(m, in_width, dtype)
                           decode heads, optional: the auxiliary head (or None), called like
                           a multi-level head → (B, h, w, n_cls) logits; the model adds them
                           as "aux_masks" in training (loss: `loss.aux_weight` × CE).
    STATE_DICT             decode heads, optional: a module with `state_dict_to_variables(sd,
                           expected, source)` / `variables_to_state_dict(variables)` (mmseg
                           `.pth` layout of the whole model, e.g. convert/mmseg_conv.py); absent
                           = the Segmenter layout (convert/mmseg.py).

A family is one component file (CONFIG keys nested under the family name) plus one line below;
models/aspp.py and models/resnet.py are the DeepLabV3 example (UperNet plugs in the same way:
its encoders return stage tuples, its head calls `conv_heads.rankseg_settings` / `build_aux`).

BatchNorm families: a component may use `batch_stats`; the train state keeps every non-param
collection in `TrainState.model_state` (empty for Segmenter), checkpointed with it; `Segmentor`
evaluates with the same collections (running statistics, train=False).
Today's Segmenter (vit + mask_transformer) keeps its parameter names: `backbone/...`,
`decode_head/...` (checkpoints and the mmseg/PyTorch interop depend on them).
"""

from __future__ import annotations

import copy
import types
from typing import Any

from rankseg_jax.models import aspp, beit, heads, resnet, swin, uper, vit

ENCODERS: dict[str, types.ModuleType] = {
    "vit": vit,
    "resnet": resnet,
    "swin": swin,
    "beit": beit,
}
DECODE_HEADS: dict[str, types.ModuleType] = {
    "mask_transformer": heads,
    "aspp": aspp,
    "uper": uper,
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
    return copy.deepcopy(merged)  # nested keys (e.g. `resnet`): the schema is updated in place


def is_multi_level(m) -> bool:
    """True for encoders that return stage tuples (the conv families)."""
    return isinstance(ENCODERS[m.encoder].out_width(m), tuple)


def state_dict_module(m) -> types.ModuleType | None:
    """The decode head's mmseg `.pth` converter module (`STATE_DICT`), None for Segmenter's."""
    return getattr(DECODE_HEADS[m.decode_head], "STATE_DICT", None)
