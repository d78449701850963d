"""mmseg state dict → Flax variables for the UperNet family (Swin, BEiT, UPerHead, FCN aux).

The Flax modules of these models are named after the mmseg modules, with list indices joined
to the preceding name (`stages.0.blocks.1.ffn.layers.0.0` → `stages_0/blocks_1/ffn/layers_0_0`),
so one generic rule maps every tensor; what differs is the leaf:

| torch leaf | Flax leaf | conversion |
|---|---|---|
| `weight` of a Linear | `params/…/kernel` (in, out) | transpose |
| `weight` of a Conv2d | `params/…/kernel` (kh, kw, in, out) | OIHW → HWIO |
| `weight` of a LayerNorm / BatchNorm | `params/…/scale` | copy |
| `weight` of a ConvTranspose2d | `params/…/weight`, kept in torch layout (in, out, kh, kw) | copy |
| `running_mean` / `running_var` | `batch_stats/…/mean` / `var` | copy |
| any other parameter (`cls_emb`, `q_bias`, `gamma_1`, bias tables, …) | same name | copy |

Buffers that the Flax modules compute instead of storing (`relative_position_index`) are
checked against the computed index by the tests; `num_batches_tracked` goes to the BatchNorm's
`batch_stats` (models/conv.py), cast to its int32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from rankseg_jax.convert.mmseg import CheckpointMismatchError

DERIVED_BUFFERS = ("relative_position_index",)


def module_path(key: str) -> tuple[tuple[str, ...], str]:
    """Module path and leaf of a torch key, list indices joined to the preceding name.

    'stages.0.blocks.1.ffn.layers.0.0.weight' → (('stages_0', 'blocks_1', 'ffn', 'layers_0_0'),
    'weight').
    """
    parts = key.split(".")
    names: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and names:
            names[-1] = f"{names[-1]}_{part}"
        else:
            names.append(part)
    return tuple(names), parts[-1]


def _convert(value: np.ndarray, target: Any, leaf: str, key: str) -> np.ndarray:
    target_shape = target.shape
    value = np.asarray(value, target.dtype)
    if target_shape == () and value.size == 1:
        value = value.reshape(())  # 0-d buffers (num_batches_tracked) may come as (1,)
    if leaf == "kernel" and value.ndim == 2:
        value = value.T
    elif leaf == "kernel" and value.ndim == 4:
        value = value.transpose(2, 3, 1, 0)
    if value.shape != tuple(target_shape):
        raise CheckpointMismatchError(
            f"{key}: shape {tuple(value.shape)} does not fit the model's {tuple(target_shape)}"
        )
    return value


def state_dict_to_variables(
    state_dict: Mapping[str, Any], target: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    """Strictly load `state_dict` (keys under `prefix`, e.g. 'backbone.') into `target`'s layout.

    `target` is the model's variables (or their `jax.eval_shape` shapes): {'params': …,
    optionally 'batch_stats': …}. Every target leaf must be filled and every tensor used
    (derived buffers aside); otherwise CheckpointMismatchError lists the differences.
    """
    flat_target = traverse_util.flatten_dict(dict(target))
    filled: dict[tuple, np.ndarray] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        path, leaf = module_path(key[len(prefix) :])
        if leaf in DERIVED_BUFFERS:
            continue
        if leaf in ("running_mean", "running_var"):
            candidates = [("batch_stats", *path, leaf.removeprefix("running_"))]
        elif leaf == "num_batches_tracked":
            candidates = [("batch_stats", *path, leaf)]
        elif leaf == "weight":
            candidates = [("params", *path, n) for n in ("kernel", "scale", "weight")]
        else:
            candidates = [("params", *path, leaf)]
        hit = next((c for c in candidates if c in flat_target), None)
        if hit is None:
            unexpected.append(key)
            continue
        filled[hit] = _convert(value, flat_target[hit], hit[-1], key)
    missing = ["/".join(k) for k in flat_target if k not in filled]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"state dict does not fit the model: missing {missing[:8]} ({len(missing)}), "
            f"unexpected {unexpected[:8]} ({len(unexpected)})"
        )
    return traverse_util.unflatten_dict(filled)


def torch_key(path: tuple[str, ...]) -> str:
    """Inverse of `module_path` for a flattened variables path ('params', …, leaf) → torch key.

    Module names ending in `_<digits>` groups are list entries ('layers_0_0' → 'layers.0.0');
    the leaf keeps its name apart from the renames of the table above.
    """
    collection, *modules, leaf = path
    parts = []
    for name in modules:
        match = re.fullmatch(r"(.*?)((?:_\d+)+)", name)
        parts.append(match[1] + match[2].replace("_", ".") if match else name)
    if collection == "batch_stats":
        leaf = leaf if leaf == "num_batches_tracked" else f"running_{leaf}"
    elif leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join([*parts, leaf])


def variables_to_state_dict(variables: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flax variables (or a gradient tree under 'params') → torch-layout arrays by torch key.

    Inverse of `state_dict_to_variables` (kernels back to (out, in) / OIHW); derived buffers
    (`relative_position_index`) are not produced.
    """
    out = {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        value = np.asarray(value)
        if path[-1] == "kernel" and value.ndim == 2:
            value = value.T
        elif path[-1] == "kernel" and value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        out[prefix + torch_key(path)] = value
    return out
