"""UperNet (models/uper.py) ± RankSeg against the official family fixtures (issue #18).

Eval-mode parity of UperNet-Swin on fam_x48 and fam_x48x80 (window padding); UperNet-BEiT's
is in test_beit.py, the train-mode parity in test_uper_train.py. Tolerance: 1e-5 of each
tensor's scale (float32).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rankseg_jax.convert.mmseg_upernet import state_dict_to_variables
from rankseg_jax.convert.segmenter_layout import state_dict_from_checkpoint
from rankseg_jax.convert.torch_pickle import load_pth
from rankseg_jax.models.segmenter import scatter_to_classes
from rankseg_jax.models.uper import (
    inference_logits,
    small_upernet,
)

RTOL = 1e-5
HEADS = ("baseline", "rankseg")


def _close(ours, ref, what: str, rtol: float = RTOL) -> None:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{what}: {ours.shape} vs {ref.shape}"
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= rtol * scale, f"{what}: max |Δ| {err:.3g} > {rtol} × {scale:.3g}"


def _load(official_family, name: str, head: str, x, **overrides):
    sd = state_dict_from_checkpoint(load_pth(official_family / f"{name}.pth"))
    model = small_upernet(
        name.split("_")[0], "rankseg" if head == "rankseg" else "base", **overrides
    )
    variables = state_dict_to_variables(sd, jax.eval_shape(model.init, jax.random.key(0), x))
    return model, variables


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("inputs", ["x48", "x48x80"])
def test_swin_upernet_eval_matches_official(official_family, head, inputs):
    """Strict load; eval encode_decode: backbone, head output (RankSeg: −100 canvas), top-k
    exact, rank-slot masks, image logits, resized logits (x48), seg_pred exact."""
    name = f"swin_upernet_{head}"
    x = np.load(official_family / f"fam_{inputs}.npy").transpose(0, 2, 3, 1)
    model, variables = _load(official_family, name, head, x)
    out, full = eval_forward(model, variables, x)
    ref = np.load(official_family / f"{name}_fwd_{inputs}.npz")
    for i in range(4):
        _close(out["features"][i], ref[f"backbone_out_{i}"].transpose(0, 2, 3, 1), f"bb {i}")
    logits = out["masks"]
    if head == "rankseg":
        np.testing.assert_array_equal(np.asarray(out["topk"]), ref["topk_index"])
        _close(out["img_logits"], ref["img_pred"], "img_pred")
        _close(out["masks"], ref["masks_topk"].transpose(0, 2, 3, 1), "masks_topk")
        logits = scatter_to_classes(out["masks"], out["topk"], 150)
    _close(logits, ref["seg_logits_feat"].transpose(0, 2, 3, 1), "seg_logits_feat")
    if "seg_logits_img0" in ref:
        _close(full[0], ref["seg_logits_img0"].transpose(1, 2, 0), "seg_logits_img0")
    np.testing.assert_array_equal(np.asarray(full.argmax(-1)), ref["seg_pred"])


def eval_forward(model, variables, x):
    """(model outputs, encode_decode logits) from one compiled eval forward."""

    def both(v, x):
        out = model.apply(v, x)
        return out, inference_logits(out, x.shape[1:3], model.n_cls)

    return jax.jit(both)(variables, x)
