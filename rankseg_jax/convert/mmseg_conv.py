"""mmseg state dict ⇄ Flax variables for the conv-head family (DeepLabV3 ± RankSeg, ResNetV1c).

The Flax trees mirror mmseg's module names, so the mapping is generic:
* a path component `name_<i>` is the torch sub-module `name.<i>` (`layer1_0` ↔ `layer1.0`,
  `aspp_modules_2` ↔ `aspp_modules.2`, `stem_3` ↔ `stem.3`);
* params: conv `kernel` HWIO ↔ `weight` OIHW, dense `kernel` (in, out) ↔ `weight` (out, in),
  norm `scale` ↔ `weight`, everything else (bias, cls_emb, cls_bias_emb, W, b) as it is;
* batch_stats: `mean` ↔ `running_mean`, `var` ↔ `running_var`, `num_batches_tracked` (int32
  here, int64 in torch).
Exports come out in torch's `state_dict` (module registration) order; loading is strict: every
missing, unexpected or misshaped key is listed in one `CheckpointError`.

`imagenet_backbone`: mmcv's ImageNet `resnet{50,101}_v1c` checkpoints (keys `stem.*`,
`layer*.*`, plus the classifier `fc.*` that a segmentor does not use) → the `backbone` subtree.
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

# One or more trailing indices: `layer1_0` ↔ `layer1.0`, `psp_modules_0_1` ↔ `psp_modules.0.1`.
_INDEXED = re.compile(r"^(.*?)((?:_\d+)+)$")
_STATS = {
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}
# torch registration order of sub-modules / tensors, by name (numbers sort numerically).
_ORDER = [
    "backbone", "decode_head", "auxiliary_head", "stem", "layer1", "layer2", "layer3", "layer4",
    "conv_seg", "cls_emb", "cls_bias_emb", "img_cls_head", "block", "norm1", "norm2", "attn",
    "qkv", "proj", "mlp", "fc1", "fc2", "norm", "fc", "W", "b", "proj_dec", "depthwise_conv",
    "pointwise_conv", "image_pool", "aspp_modules", "bottleneck", "convs", "conv1", "bn1",
    "conv2", "bn2", "conv3", "bn3", "downsample", "conv", "bn", "weight", "bias", "running_mean",
    "running_var", "num_batches_tracked",
]  # fmt: skip
_RANK = {name: i for i, name in enumerate(_ORDER)}


def _module_name(component: str) -> str:
    m = _INDEXED.match(component)
    return m.group(1) + m.group(2).replace("_", ".") if m else component


def torch_key(collection: str, path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """(mmseg key, kind) of a Flax leaf; kind 'conv', 'dense', 'int' or 'same'."""
    modules = ".".join(_module_name(c) for c in path[:-1])
    leaf = path[-1]
    if collection == "batch_stats":
        name = _STATS[leaf]
        kind = "int" if leaf == "num_batches_tracked" else "same"
    elif leaf == "kernel":
        name, kind = "weight", ("conv" if ndim == 4 else "dense")
    elif leaf == "scale":
        name, kind = "weight", "same"
    else:
        name, kind = leaf, "same"
    return (f"{modules}.{name}" if modules else name), kind


def _sort_key(key: str) -> tuple:
    return tuple(
        (0, int(p)) if p.isdigit() else (1, _RANK.get(p, len(_RANK))) for p in key.split(".")
    )


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if kind == "dense":
        return np.ascontiguousarray(value.T)
    if kind == "int":
        return np.asarray(value, np.int64).reshape(())
    return np.ascontiguousarray(value)


def _to_flax(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if kind == "dense":
        return np.ascontiguousarray(value.T)
    if kind == "int":
        return np.asarray(value, np.int32).reshape(())
    return np.ascontiguousarray(value)


def _torch_shape(shape: tuple, kind: str) -> tuple:
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "dense":
        return (shape[1], shape[0])
    return tuple(shape)


def _leaves(variables: Mapping[str, Any]) -> dict[tuple[str, tuple[str, ...]], Any]:
    out = {}
    for collection in ("params", "batch_stats"):
        if collection in variables:
            flat = traverse_util.flatten_dict(dict(variables[collection]))
            out.update({(collection, path): v for path, v in flat.items()})
    return out


def variables_to_state_dict(variables: Mapping[str, Any]) -> StateDict:
    """Flax {'params', 'batch_stats'} → mmseg state dict (numpy, torch layouts, torch order)."""
    items = []
    for (collection, path), value in _leaves(variables).items():
        value = np.asarray(value)
        key, kind = torch_key(collection, path, value.ndim)
        items.append((key, _to_torch(value, kind)))
    return StateDict(sorted(items, key=lambda kv: _sort_key(kv[0])))


def state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray],
    expected: Mapping[str, Any],
    source: str = "state dict",
    key_prefix: str = "",
) -> dict[str, Any]:
    """Strict mmseg state dict → Flax variables shaped like `expected` (e.g. `jax.eval_shape` of
    the model's init). Raises CheckpointError listing every problem.

    `key_prefix`: the state dict's keys lack this prefix of the model's names (an ImageNet
    backbone file names `stem.0.weight` what the segmentor calls `backbone.stem.0.weight`);
    problems are then reported in the file's own names.
    """
    wanted = {}
    for (collection, path), leaf in _leaves(expected).items():
        key, kind = torch_key(collection, path, len(leaf.shape))
        if not key.startswith(key_prefix):
            raise ValueError(f"model key {key} lacks the prefix {key_prefix!r}")
        wanted[key[len(key_prefix) :]] = (collection, path, kind, tuple(leaf.shape), leaf.dtype)
    missing = [k for k in wanted if k not in state_dict]
    unexpected = [k for k in state_dict if k not in wanted]
    misshaped = [
        f"{k} {tuple(np.shape(state_dict[k]))} != {_torch_shape(w[3], w[2])}"
        for k, w in wanted.items()
        if k in state_dict and tuple(np.shape(state_dict[k])) != _torch_shape(w[3], w[2])
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", misshaped)):
        if items:
            shown = ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    trees: dict[str, dict] = {}
    for key, (collection, path, kind, _, dtype) in wanted.items():
        value = _to_flax(np.asarray(state_dict[key]), kind)
        if kind != "int":
            value = value.astype(dtype)
        trees.setdefault(collection, {})[path] = value
    return {c: traverse_util.unflatten_dict(flat) for c, flat in trees.items()}


def imagenet_backbone(
    state_dict: Mapping[str, np.ndarray], expected: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, Any]:
    """mmcv ImageNet ResNetV1c state dict (`stem.*`, `layer*.*`, `fc.*`) → the `backbone`
    subtree of `expected` (variables with a top-level 'backbone' in each collection).

    The classifier (`fc.*`) is dropped; every other key must fit the backbone strictly (a
    missing or extra key is one CheckpointError naming `source` and the file's keys), except
    that a missing BN `num_batches_tracked` counts 0, as torch's BatchNorm loads a file saved
    before that buffer existed. Returns {'params': {'backbone': ...}, 'batch_stats':
    {'backbone': ...}}.
    """
    state = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    backbone = {c: {"backbone": expected[c]["backbone"]} for c in ("params", "batch_stats")}
    for (collection, path), _ in _leaves(backbone).items():
        if collection == "batch_stats" and path[-1] == "num_batches_tracked":
            key = torch_key(collection, path, 0)[0].removeprefix("backbone.")
            state.setdefault(key, np.zeros((), np.int64))
    return state_dict_to_variables(
        state, backbone, f"{source} (as an ImageNet ResNet backbone)", key_prefix="backbone."
    )
