"""mmseg state dict ⇄ Flax variables for UperNet on Swin / BEiT (issue #18).

The Flax modules are named after the mmseg modules (`stages.0.blocks.1.ffn.layers.0.0` ↔
`stages_0/blocks_1/ffn/layers_0_0`, `fpn1.0` ↔ `fpn1_0`), so the generic mapping of
convert/mmseg_conv.py applies unchanged; BEiT's transposed convs keep torch's weight layout
under the leaf `weight` (copied as is). What this module adds: the relative position index
buffers, which the Flax modules compute instead of storing. Loading checks every one of them
against the computed index (a checkpoint built for another window / grid fails with its key);
exporting writes them back so that the official code loads the file strictly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from rankseg_jax.convert import mmseg_conv
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
