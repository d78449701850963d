"""UperNet ± RankSeg train-mode parity against the official family fixtures (issue #18).

One train-mode forward / backward as the fixtures ran it (BN on batch statistics, updating
its running stats; dropout and drop-path 0): every logged loss term, every gradient, every BN
running statistic. Swin fully; BEiT only where its fixture is deterministic (see the test).
Tolerance: 1e-5 of each tensor's scale (float32), except where a comment derives otherwise.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from rankseg_jax.convert.mmseg_upernet import state_dict_to_variables, variables_to_state_dict
from rankseg_jax.convert.segmenter_layout import state_dict_from_checkpoint
from rankseg_jax.convert.torch_pickle import load_pth
from rankseg_jax.models.deeplab import deeplab_loss_terms
from rankseg_jax.models.uper import BEIT_RANKSEG_LOSS, SWIN_RANKSEG_LOSS, small_upernet

RTOL = 1e-5
HEADS = ("baseline", "rankseg")


def _close(ours, ref, what: str) -> None:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{what}: {ours.shape} vs {ref.shape}"
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= RTOL * scale, f"{what}: max |Δ| {err:.3g} > {RTOL} × {scale:.3g}"


def _load(official_family, name: str, head: str, x, **overrides):
    sd = state_dict_from_checkpoint(load_pth(official_family / f"{name}.pth"))
    backbone = name.split("_")[0]
    model = small_upernet(backbone, "rankseg" if head == "rankseg" else "base", **overrides)
    variables = state_dict_to_variables(sd, jax.eval_shape(model.init, jax.random.key(0), x))
    return model, variables


def _train_step(official_family, name: str, head: str, loss_config: dict):
    """One train forward/backward as the fixtures ran it (dropout, drop-path 0)."""
    x = np.load(official_family / "fam_x48.npy").transpose(0, 2, 3, 1)
    y = np.load(official_family / f"{name}_y48.npy")
    zero = dict(drop_path_rate=0.0, dropout=0.0, img_dropout=0.0)
    model, variables = _load(official_family, name, head, x, **zero)

    def loss_fn(params):
        out, updated = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            True,
            mutable=["batch_stats"],
        )
        terms = deeplab_loss_terms(out, y, 150, loss_config)
        return terms.total, (terms.metrics, updated)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, (metrics, updated)), grads = step(variables["params"])
    grads = variables_to_state_dict({"params": grads})
    grads = {k: v for k, v in grads.items() if not k.endswith("relative_position_index")}
    return metrics, grads, variables_to_state_dict(updated)


# Gradients whose exact value is 0: the per-stage norms of stages 1-2 reach the loss only through
# a 1×1 lateral conv followed by train-mode BN, which subtracts any per-channel constant, so a
# bias shift of those norms cannot change the loss. Both implementations return float32 noise
# (~1e-8 against gradients ~1e-1): checked as |g| ≤ 1e-6 × the largest gradient, ours and theirs.
ZERO_GRADS = ("backbone.norm0.bias", "backbone.norm1.bias")
# Pool scale 1 on the 2×2 top map gives one value per image and channel: the PPM BN normalises
# 2 values, so its output is ±γ up to ε and the conv-weight gradient is the remainder of a
# cancellation between terms of the size of the gradient entering the BN (≤ the largest
# gradient). Its float32 rounding error is therefore ~ε_f32 × that size: checked at 1e-6 × the
# largest gradient (8 ε_f32) instead of 1e-5 × its own (cancelled, 1e-4) scale.
CANCELLED_GRADS = ("decode_head.psp_modules.0.1.conv.weight",)


@pytest.mark.parametrize("head", HEADS)
def test_swin_upernet_train_matches_official(official_family, head):
    """Loss terms, every gradient and every BN running statistic after one train forward."""
    name = f"swin_upernet_{head}"
    metrics, grads, stats = _train_step(official_family, name, head, SWIN_RANKSEG_LOSS)
    losses = json.loads((official_family / f"{name}_loss.json").read_text())["losses"]
    for key, value in losses.items():
        assert float(metrics[key]) == pytest.approx(value, rel=RTOL, abs=1e-6), key
    ref = np.load(official_family / f"{name}_grads.npz")
    assert set(grads) == set(ref.files)
    top = max(float(np.abs(ref[k]).max()) for k in ref.files)
    for key in ref.files:
        if key in ZERO_GRADS:
            assert np.abs(grads[key]).max() <= 1e-6 * top, key
            assert np.abs(ref[key]).max() <= 1e-6 * top, key
        elif key in CANCELLED_GRADS:
            assert np.abs(grads[key] - ref[key]).max() <= 1e-6 * top, key
        else:
            _close(grads[key], ref[key], f"grad {key}")
    bn = np.load(official_family / f"{name}_bn_after_train_forward.npz")
    assert set(stats) >= set(bn.files)
    for key in bn.files:
        _close(stats[key], bn[key], f"bn {key}")


def test_beit_train_forward_where_the_fixture_is_deterministic(official_family):
    """The BEiT train fixtures were made with the BEiT backbone's own DropPath still active
    (their `dropout_set_to_zero` lists no DropPath; drop_path_rate 0.2 → 0, .067, .133, .2 over
    the 4 blocks), so only what depends on block 0 alone (rate 0: Identity) is deterministic:
    the fpn1 BN and the stride-4 lateral BN statistics. Those must match; the stats fed by
    blocks 1-3 differ by amounts growing with the block's drop rate (measured: lateral_convs.1
    3e-5, lateral_convs.2 3e-4, psp 6e-4 absolute), which is why nothing else is compared."""
    name = "beit_upernet_baseline"
    _, _, stats = _train_step(official_family, name, "baseline", BEIT_RANKSEG_LOSS)
    bn = np.load(official_family / f"{name}_bn_after_train_forward.npz")
    for key in [
        k for k in bn.files if k.startswith(("backbone.fpn1.1.", "decode_head.lateral_convs.0."))
    ]:
        _close(stats[key], bn[key], f"bn {key}")
    drifted = float(
        np.abs(
            stats["decode_head.psp_modules.0.1.bn.running_mean"]
            - bn["decode_head.psp_modules.0.1.bn.running_mean"]
        ).max()
    )
    assert drifted > 1e-4, "the BEiT fixture now matches beyond block 0: compare everything"
