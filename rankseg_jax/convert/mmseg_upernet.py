"""mmseg state dict ⇄ Flax variables for UperNet on Swin / BEiT (issue #18).

The Flax modules are named after the mmseg modules (`stages.0.blocks.1.ffn.layers.0.0` ↔
`stages_0/blocks_1/ffn/layers_0_0`, `fpn1.0` ↔ `fpn1_0`), so the generic mapping of
convert/mmseg_conv.py applies unchanged; BEiT's transposed convs keep torch's weight layout
under the leaf `weight` (copied as is). What this module adds: the relative position index
buffers, which the Flax modules compute instead of storing. Loading checks every one of them
against the computed index (a checkpoint built for another window / grid fails with its key);
exporting writes them back so that the official code loads the file strictly.

`pretrained_backbone`: the public classification checkpoints of the rows' backbones (Microsoft
Swin, unilm BEiT; weights registry `swin_base_patch4_window12_384_22k`,
`beit_large_patch16_224_pt22k_ft22k`) → the `backbone` leaves of a UperNet's variables, converted
as mmseg / unilm do on load (convert/swin_pretrained.py, convert/beit_pretrained.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from rankseg_jax.convert import mmseg_conv
from rankseg_jax.convert.beit_pretrained import beit_backbone_state
from rankseg_jax.convert.swin_pretrained import swin_backbone_state
from rankseg_jax.errors import CheckpointError
from rankseg_jax.models import beit, swin

_SWIN_INDEX = re.compile(r"(.*\.stages\.\d+\.blocks\.\d+\.attn\.w_msa)\.relative_position_index$")
_BEIT_INDEX = re.compile(r"(.*\.blocks\.\d+\.attn)\.relative_position_index$")


def _expected_index(key: str, state_dict: Mapping[str, Any]) -> np.ndarray | None:
    """The index the Flax module computes for `key`'s attention, from its bias table's size."""
    for pattern, kind in ((_SWIN_INDEX, "swin"), (_BEIT_INDEX, "beit")):
        m = pattern.fullmatch(key) or pattern.fullmatch("." + key)
        if not m:
            continue
        table = state_dict.get(f"{m[1]}.relative_position_bias_table".lstrip("."))
        if table is None:
            return None
        n_rel = np.shape(table)[0]
        if kind == "swin":
            window = (int(round(np.sqrt(n_rel))) + 1) // 2
            return swin.relative_position_index(window)
        side = (int(round(np.sqrt(n_rel - 3))) + 1) // 2
        return beit.relative_position_index((side, side))
    return None


def state_dict_to_variables(
    state_dict: Mapping[str, Any], expected: Mapping[str, Any], source: str = "state dict"
) -> dict[str, Any]:
    """Strict load (mmseg_conv rules) after checking and dropping the relative position indices.

    expected: the model's variables or their `jax.eval_shape` shapes.
    """
    rest = {}
    for key, value in state_dict.items():
        if not key.endswith("relative_position_index"):
            rest[key] = value
            continue
        want = _expected_index(key, state_dict)
        if want is None or np.shape(value) != want.shape or not np.array_equal(value, want):
            raise CheckpointError(
                f"{source}: {key} is not the index this model computes for its window / grid"
            )
    return mmseg_conv.state_dict_to_variables(rest, expected, source)


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax variables → mmseg state dict (torch layouts) with the relative position indices."""
    out = dict(mmseg_conv.variables_to_state_dict(variables))
    tables = [k for k in out if k.endswith(".relative_position_bias_table")]
    for key in [k for k in tables if np.ndim(out[k]) == 2]:  # not for trees of per-leaf scalars
        index_key = key.removesuffix("relative_position_bias_table") + "relative_position_index"
        index = _expected_index(index_key, out)
        if index is not None:
            out[index_key] = index.astype(np.int64)
    return out


# Backbone modules a classification checkpoint does not have: they keep their initial values,
# as in mmseg / unilm (Swin's per-stage output norms, BEiT's fpn1–fpn4 necks).
_FRESH = {"swin": ("backbone.norm",), "beit": ("backbone.fpn",)}


def pretrained_kind(state_dict: Mapping[str, Any]) -> str | None:
    """'swin' (Microsoft layout: `layers.i.blocks.j.attn.*`), 'beit' (unilm: `blocks.i.attn.
    q_bias`) or None for a state dict that is neither."""
    if any(
        k.startswith("layers.") and ".attn.relative_position_bias_table" in k for k in state_dict
    ):
        return "swin"
    if any(k.startswith("blocks.") and k.endswith(".attn.q_bias") for k in state_dict):
        return "beit"
    return None


def pretrained_backbone(
    state_dict: Mapping[str, Any], expected: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, Any]:
    """A Swin / BEiT classification state dict → {'params': {'backbone': ...}} holding every
    backbone leaf the checkpoint provides (the rest keep their initial values: merge this into
    the initial variables).

    expected: the UperNet's variables or shapes ({'params', 'batch_stats'}). Strict: every
    converted key must exist with its shape, and every backbone parameter except the fresh
    modules (`_FRESH`) must be provided; else one CheckpointError listing the problems.
    """
    kind = pretrained_kind(state_dict)
    leaves = {
        c: traverse_util.flatten_dict(dict(expected[c])) for c in ("params", "batch_stats")
        if c in expected
    }  # fmt: skip
    flat = {
        mmseg_conv.torch_key(c, path, len(leaf.shape))[0]: (c, path)
        for c, tree in leaves.items()
        for path, leaf in tree.items()
        if path[0] == "backbone"
    }
    if kind == "swin":
        converted = swin_backbone_state(state_dict)
    elif kind == "beit":
        depth = len({k.split(".")[2] for k in flat if k.startswith("backbone.blocks.")})
        table = expected["params"]["backbone"]["blocks_0"]["attn"]["relative_position_bias_table"]
        side = (int(round(np.sqrt(table.shape[0] - 3))) + 1) // 2
        converted = beit_backbone_state(state_dict, depth, (side, side))
    else:
        raise CheckpointError(
            f"{source}: not a Swin (layers.*) or BEiT (blocks.*.attn.q_bias) backbone checkpoint"
        )
    unknown = sorted(k for k in converted if k not in flat)
    missing = sorted(k for k in flat if k not in converted and not k.startswith(_FRESH[kind]))
    if unknown or missing:
        shown = [f"{label}: {', '.join(keys[:8])}" for label, keys in
                 (("unexpected", unknown), ("missing", missing)) if keys]  # fmt: skip
        raise CheckpointError(f"{source} does not fit the {kind} backbone: " + "; ".join(shown))
    subset: dict[str, dict] = {}
    for key in converted:
        collection, path = flat[key]
        subset.setdefault(collection, {})[path] = leaves[collection][path]
    subset_tree = {c: traverse_util.unflatten_dict(v) for c, v in subset.items()}
    return mmseg_conv.state_dict_to_variables(converted, subset_tree, source)
