"""mmseg state dict ⇄ Flax params for Segmenter / RankSeg (rankseg-spec.md section 6.2).

The Flax tree mirrors mmseg's names, so each tensor maps by one rename and at most one
transpose: Linear (out, in) ↔ Dense kernel (in, out); Conv OIHW ↔ HWIO; LayerNorm weight ↔
scale. The interchange format is an ordered dict of numpy arrays keyed by mmseg names, in
PyTorch `state_dict` order, so exports are byte-for-byte what the official code writes.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from rankseg_jax.errors import CheckpointError

StateDict = collections.OrderedDict


# (flax path regex, torch key template, kind). Kinds: "dense" transposes 2-D kernels,
# "conv" OIHW⇄HWIO, "same" copies. Templates use \\1 for the captured index.
_RULES = [
    (r"backbone/patch_embed/kernel", "backbone.patch_embed.projection.weight", "conv"),
    (r"backbone/patch_embed/bias", "backbone.patch_embed.projection.bias", "same"),
    (r"backbone/(cls_token|pos_embed|cls_emb)", r"backbone.\1", "same"),
    (r"backbone/layers_(\d+)/(ln1|ln2)/scale", r"backbone.layers.\1.\2.weight", "same"),
    (r"backbone/layers_(\d+)/(ln1|ln2)/bias", r"backbone.layers.\1.\2.bias", "same"),
    (
        r"backbone/layers_(\d+)/attn/qkv/kernel",
        r"backbone.layers.\1.attn.attn.in_proj_weight",
        "dense",
    ),
    (r"backbone/layers_(\d+)/attn/qkv/bias", r"backbone.layers.\1.attn.attn.in_proj_bias", "same"),
    (
        r"backbone/layers_(\d+)/attn/out/kernel",
        r"backbone.layers.\1.attn.attn.out_proj.weight",
        "dense",
    ),
    (r"backbone/layers_(\d+)/attn/out/bias", r"backbone.layers.\1.attn.attn.out_proj.bias", "same"),
    (r"backbone/layers_(\d+)/ffn/fc1/kernel", r"backbone.layers.\1.ffn.layers.0.0.weight", "dense"),
    (r"backbone/layers_(\d+)/ffn/fc1/bias", r"backbone.layers.\1.ffn.layers.0.0.bias", "same"),
    (r"backbone/layers_(\d+)/ffn/fc2/kernel", r"backbone.layers.\1.ffn.layers.1.weight", "dense"),
    (r"backbone/layers_(\d+)/ffn/fc2/bias", r"backbone.layers.\1.ffn.layers.1.bias", "same"),
    (r"backbone/ln_final/scale", "backbone.ln1.weight", "same"),
    (r"backbone/ln_final/bias", "backbone.ln1.bias", "same"),
    (r"decode_head/blocks_(\d+)/(.+)/kernel", r"decode_head.blocks.\1.\2.weight", "dense"),
    (r"decode_head/blocks_(\d+)/(norm1|norm2)/scale", r"decode_head.blocks.\1.\2.weight", "same"),
    (r"decode_head/blocks_(\d+)/(.+)/bias", r"decode_head.blocks.\1.\2.bias", "same"),
    (r"decode_head/proj_dec/kernel", "decode_head.proj_dec.weight", "dense"),
    (r"decode_head/proj_dec/bias", "decode_head.proj_dec.bias", "same"),
    (r"decode_head/(decoder_norm2?|mask_norm)/scale", r"decode_head.\1.weight", "same"),
    (r"decode_head/(decoder_norm2?|mask_norm)/bias", r"decode_head.\1.bias", "same"),
    (r"decode_head/(cls_emb|proj_patch|proj_classes)", r"decode_head.\1", "same"),
    (r"decode_head/ml_fc/(W|b)", r"decode_head.ml_fc.\1", "same"),
]
_COMPILED = [(re.compile(f"^{p}$"), t, k) for p, t, k in _RULES]

# PyTorch registration order inside each module (state_dict order), by key suffix.
_BACKBONE_LAYER_ORDER = [
    "ln1.weight", "ln1.bias", "attn.attn.in_proj_weight", "attn.attn.in_proj_bias",
    "attn.attn.out_proj.weight", "attn.attn.out_proj.bias", "ln2.weight", "ln2.bias",
    "ffn.layers.0.0.weight", "ffn.layers.0.0.bias", "ffn.layers.1.weight", "ffn.layers.1.bias",
]  # fmt: skip
_BLOCK_ORDER = [
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight",
    "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
]  # fmt: skip
_TOP_ORDER = [
    "backbone.cls_token", "backbone.pos_embed", "backbone.cls_emb",
    "backbone.patch_embed.projection.weight", "backbone.patch_embed.projection.bias",
    "backbone.layers.", "backbone.ln1.weight", "backbone.ln1.bias",
    "decode_head.cls_emb", "decode_head.proj_patch", "decode_head.proj_classes",
    "decode_head.blocks.", "decode_head.proj_dec.weight", "decode_head.proj_dec.bias",
    "decode_head.decoder_norm.weight", "decode_head.decoder_norm.bias",
    "decode_head.decoder_norm2.weight", "decode_head.decoder_norm2.bias",
    "decode_head.mask_norm.weight", "decode_head.mask_norm.bias",
    "decode_head.mask_norm.gamma", "decode_head.mask_norm.beta",
    "decode_head.ml_fc.W", "decode_head.ml_fc.b",
]  # fmt: skip


def torch_name(flax_path: str, gt_head: bool = False) -> tuple[str, str]:
    """The mmseg key and conversion kind for a '/'-joined Flax param path."""
    for pattern, template, kind in _COMPILED:
        if pattern.match(flax_path):
            key = pattern.sub(template, flax_path).replace("/", ".")
            if gt_head and key.startswith("decode_head.mask_norm."):
                key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
            return key, kind
    raise KeyError(f"no mmseg name for Flax parameter {flax_path}")


def _sort_key(key: str) -> tuple:
    for rank, prefix in enumerate(_TOP_ORDER):
        if prefix.endswith(".") and key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            order = _BACKBONE_LAYER_ORDER if "layers" in prefix else _BLOCK_ORDER
            return (rank, int(index), order.index(rest))
        if key == prefix:
            return (rank, 0, 0)
    raise KeyError(f"unknown mmseg key {key}")


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    if kind == "dense" and value.ndim == 2:
        return value.T
    return value


def _torch_shape(shape: tuple, kind: str) -> tuple:
    if kind == "conv":
        return tuple(shape[i] for i in (3, 2, 0, 1))
    if kind == "dense" and len(shape) == 2:
        return shape[::-1]
    return shape


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "dense" and value.ndim == 2:
        return value.T
    return value


def params_to_state_dict(params: Mapping[str, Any], gt_head: bool = False) -> StateDict:
    """Flax params → mmseg state dict (float32 numpy, PyTorch order, C-contiguous)."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    out = {}
    for path, value in flat.items():
        key, kind = torch_name(path, gt_head)
        out[key] = np.ascontiguousarray(_to_torch(np.asarray(value, np.float32), kind))
    return StateDict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def state_dict_to_params(
    state_dict: Mapping[str, Any],
    expected: Mapping[str, Any],
    gt_head: bool = False,
    source: str = "state dict",
) -> dict:
    """mmseg state dict → Flax params shaped like `expected` (e.g. from jax.eval_shape).

    Raises CheckpointError listing every missing key, unexpected key and wrong shape
    (both shapes) in one message that names `source`.
    """  # fmt: skip
    flat = traverse_util.flatten_dict(dict(expected), sep="/")
    wanted = {torch_name(p, gt_head)[0]: p for p in flat}
    problems = _mismatches(state_dict, wanted, flat, gt_head)
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    params = {}
    for key, path in wanted.items():
        kind = torch_name(path, gt_head)[1]
        params[path] = _to_flax(np.asarray(state_dict[key], np.float32), kind)
    return traverse_util.unflatten_dict(params, sep="/")


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _mismatches(state_dict, wanted, flat, gt_head) -> list[str]:
    missing = sorted(set(wanted) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(wanted))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    shapes = []
    for key in sorted(set(wanted) & set(state_dict)):
        path = wanted[key]
        kind = torch_name(path, gt_head)[1]
        want = _torch_shape(tuple(flat[path].shape), kind)
        got = tuple(np.shape(state_dict[key]))
        if want != got:
            shapes.append(f"{key} has shape {got}, the model expects {want}")
    if shapes:
        problems.append(f"{len(shapes)} wrong shapes: {_listing(shapes, 4)}")
    return problems
