"""Pretrained BEiT (unilm classification checkpoints) → the seg backbone's state dict at a new grid.

unilm's segmentation `init_weights` / `load_checkpoint` (the fork's `backbones/helpers/beit.py`),
re-implemented:

* a shared `rel_pos_bias.relative_position_bias_table` (BEiT pretraining) is copied into every
  block's `blocks.{i}.attn.relative_position_bias_table`;
* each table ((2s−1)² + 3, heads) built for another grid is resized to (2d−1)² + 3 rows: the last
  3 rows (cls→token, token→cls, cls→cls) are kept; per head, the (2s−1)² grid of relative
  offsets is placed at *geometric* positions (offsets 1, 1+q, 1+q+q², … with q found by
  bisection on [1.01, 1.5] so that the largest reaches d−1) and a bicubic interpolating spline
  through them (scipy `interp2d(kind='cubic')`, which on a rectangular grid is FITPACK's
  `regrid_smth` with s=0, as `RectBivariateSpline(kx=ky=3, s=0)`) is read at the integer
  offsets −(d−1) … d−1;
* classifier-only keys (`head.*`, `fc_norm.*`, `norm.*`, `mask_token`, `lm_head.*`,
  `rel_pos_bias.*` after the copy) are dropped; the remaining keys get the `backbone.` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

_DROPPED = ("head.", "fc_norm.", "norm.", "lm_head.", "mask_token", "rel_pos_bias.")


def geometric_ratio(src_half: int, dst_half: int) -> float:
    """unilm's bisection: q with 1 + q + … + q^(src_half−1) ≈ dst_half (tolerance 1e-6)."""
    left, right = 1.01, 1.5
    q = (left + right) / 2.0
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q**src_half) / (1.0 - q) > dst_half:
            right = q
        else:
            left = q
    return q


def interpolate_rel_pos_table(table: np.ndarray, dst_size: int) -> np.ndarray:
    """table ((2s−1)² + 3, heads) → ((dst_size)² + 3, heads); dst_size = 2d − 1 (odd)."""
    # scipy is needed only to convert pretrained checkpoints.
    from scipy import interpolate

    n, heads = table.shape
    src_size = int(round(np.sqrt(n - 3)))
    if src_size * src_size + 3 != n:
        raise ValueError(f"relative position table with {n} rows is not (2s−1)² + 3")
    if src_size == dst_size:
        return np.asarray(table, np.float32)
    extra, grid = table[-3:], np.asarray(table[:-3], np.float64)
    q = geometric_ratio(src_size // 2, dst_size // 2)
    dis, cur = [], 1.0
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    coords = np.array([-d for d in reversed(dis)] + [0.0] + dis)
    t = dst_size // 2
    targets = np.arange(-t, t + 0.1, 1.0)
    columns = []
    for h in range(heads):
        z = grid[:, h].reshape(src_size, src_size)  # rows: offset along the first axis
        spline = interpolate.RectBivariateSpline(coords, coords, z, kx=3, ky=3, s=0)
        columns.append(spline(targets, targets).reshape(-1).astype(np.float32))
    return np.concatenate([np.stack(columns, axis=1), np.asarray(extra, np.float32)], axis=0)


def beit_backbone_state(
    checkpoint: Mapping[str, Any], depth: int, grid: tuple[int, int]
) -> dict[str, np.ndarray]:
    """A unilm BEiT checkpoint's `model` dict → `backbone.*` keys for the seg BEiT at `grid`
    (patch grid, e.g. (40, 40) at 640/16). The fpn necks are not in it (they start fresh)."""
    state = {k: np.asarray(v) for k, v in checkpoint.items()}
    shared = state.get("rel_pos_bias.relative_position_bias_table")
    if shared is not None:
        for i in range(depth):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = shared
    dst = 2 * grid[0] - 1
    if grid[0] != grid[1]:
        raise ValueError(f"BEiT pretrained loading supports square grids, got {grid}")
    out = {}
    for key, value in state.items():
        if key.startswith(_DROPPED) or key.endswith("relative_position_index"):
            continue
        if key.endswith("relative_position_bias_table"):
            value = interpolate_rel_pos_table(value, dst)
        out[f"backbone.{key}"] = value
    return out
