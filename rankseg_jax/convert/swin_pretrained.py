"""Microsoft Swin classification checkpoints → mmseg SwinTransformer keys (mmseg `swin2mmseg`).

The public Swin-B 22k 384 file (`swin_base_patch4_window12_384_22k.pth`, key `model`) uses the
original names; mmseg's converter renames them and reorders the patch-merging weights:

* `layers.i` → `stages.i`; `attn.*` → `attn.w_msa.*`; `mlp.fc1` → `ffn.layers.0.0`,
  `mlp.fc2` → `ffn.layers.1`; `patch_embed.proj` → `patch_embed.projection`;
* patch merging: the original concatenates the 2×2 neighbours as [x(0,0), x(1,0), x(0,1),
  x(1,1)] along channels (neighbour-major), mmseg's `nn.Unfold` gives channel-major
  [c0(0,0), c0(0,1), c0(1,0), c0(1,1), c1…]: `downsample.reduction.weight` columns and
  `downsample.norm` entries are permuted accordingly;
* dropped: `head.*` (classifier), the final `norm.*` (mmseg has per-stage `norm0..3`, which
  start from their init, as in mmseg), and the buffers `attn_mask`, `relative_position_index`.

Everything gets the `backbone.` prefix, ready for `mmseg_upernet.state_dict_to_variables` with
the backbone-only subset of a UperNet's variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# Original neighbour block j → position in the unfold order (row-major 2×2 kernel).
_TO_UNFOLD = [0, 2, 1, 3]


def _reduction_weight(w: np.ndarray) -> np.ndarray:
    """(out, 4C) neighbour-major columns → channel-major (Unfold) columns."""
    out, c4 = w.shape
    return w.reshape(out, 4, c4 // 4)[:, _TO_UNFOLD, :].transpose(0, 2, 1).reshape(out, c4)


def _norm_vector(v: np.ndarray) -> np.ndarray:
    """(4C,) neighbour-major → channel-major."""
    return v.reshape(4, -1)[_TO_UNFOLD, :].T.reshape(-1)


def swin_backbone_state(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The original Swin `model` dict → mmseg `backbone.*` keys (see the module docstring)."""
    out = {}
    for key, value in checkpoint.items():
        value = np.asarray(value)
        if key.startswith(("head.", "norm.")) or key.endswith(
            ("attn_mask", "relative_position_index")
        ):
            continue
        new = key
        if key.startswith("layers."):
            if ".attn." in key:
                new = key.replace(".attn.", ".attn.w_msa.")
            elif ".mlp.fc1." in key:
                new = key.replace(".mlp.fc1.", ".ffn.layers.0.0.")
            elif ".mlp.fc2." in key:
                new = key.replace(".mlp.fc2.", ".ffn.layers.1.")
            elif ".downsample.reduction." in key:
                value = _reduction_weight(value)
            elif ".downsample.norm." in key:
                value = _norm_vector(value)
            new = new.replace("layers.", "stages.", 1)
        elif key.startswith("patch_embed.proj."):
            new = key.replace("patch_embed.proj.", "patch_embed.projection.")
        out[f"backbone.{new}"] = value
    return out
