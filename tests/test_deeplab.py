"""DeepLabV3 (ResNetV1c-d8 + ASPP + FCN aux) with and without RankSeg against the official modules
(../shared/fixtures/official_family, see its README): strict checkpoint load and export order,
eval forward, train losses, gradients and BN running stats; full-size parameter counts; SyncBN
over simulated meshes; export → a torch model written from the spec.

Tolerances: every compared float tensor within 1e-5 of its own scale (max |ref|), losses 1e-5
relative, BN running stats 1e-6 of their scale, top-k ids and the argmax map exact. The one
exception (gradients that flow through ASPP's image-pool BN) is derived in
`test_train_forward_losses_grads_and_bn_stats`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax.convert import mmseg_conv
from rankseg_jax.convert.mmseg import CheckpointMismatchError
from rankseg_jax.convert.torch_pickle import load_pth, state_dict_from_checkpoint
from rankseg_jax.models.deeplab import small_deeplabv3
from rankseg_jax.models.segmenter import CANVAS_FILL, scatter_to_classes

MODELS = ("deeplab_rankseg", "deeplab_baseline")
N_CLS = 171
TOL = 1e-5
BN_TOL = 1e-6


def _rel(a, b) -> float:
    """max |a − b| over the reference's scale max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _head(name: str) -> str:
    return "rankseg" if name.endswith("rankseg") else "base"


def _load(path, name: str, **overrides):
    """(model, variables, state dict) of an official small checkpoint."""
    sd = state_dict_from_checkpoint(load_pth(path / f"{name}.pth", use_torch=False))
    model = small_deeplabv3(N_CLS, _head(name), **overrides)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3))))
    return model, mmseg_conv.state_dict_to_variables(sd, expected, name), sd


@pytest.fixture(scope="module", params=MODELS)
def loaded(request, official_family):
    name = request.param
    model, variables, sd = _load(official_family, name)
    return name, model, variables, sd


def test_strict_load_and_export_in_torch_order(loaded):
    """Every tensor maps (BN buffers included); the export is the state dict, key for key, in
    torch's order, bit-identical, num_batches_tracked a 0-d int64."""
    name, model, variables, sd = loaded
    back = mmseg_conv.variables_to_state_dict(variables)
    assert list(back) == list(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    tracked = [k for k in sd if k.endswith("num_batches_tracked")]
    assert tracked and all(sd[k].shape == () and sd[k].dtype == np.int64 for k in tracked)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3))))
    broken = dict(sd)
    del broken["backbone.layer1.0.bn1.running_var"]
    broken["decode_head.extra.weight"] = np.zeros(1, np.float32)
    broken["backbone.stem.0.weight"] = np.zeros((4, 3, 1, 1), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        mmseg_conv.state_dict_to_variables(broken, expected, "x.pth")
    text = str(info.value)
    for part in ("layer1.0.bn1.running_var", "decode_head.extra.weight", "stem.0.weight"):
        assert part in text


@pytest.mark.parametrize("size", ["x48", "x48x80"])
def test_eval_forward_matches_official(loaded, official_family, size):
    name, model, variables, _ = loaded
    x = np.load(official_family / f"fam_{size}.npy").transpose(0, 2, 3, 1)
    ref = np.load(official_family / f"{name}_fwd_{size}.npz")
    out = jax.jit(lambda v, im: model.apply(v, im, False))(variables, x)
    for i in range(4):
        assert _rel(_nchw(out["features"][i]), ref[f"backbone_out_{i}"]) <= TOL, i
    canvas = _nchw(scatter_to_classes(out["masks"], out["topk"], N_CLS))
    feat = ref["seg_logits_feat"]
    off = feat == CANVAS_FILL
    np.testing.assert_array_equal(canvas == CANVAS_FILL, off)
    assert _rel(canvas[~off], feat[~off]) <= TOL
    if _head(name) == "rankseg":
        assert _rel(out["img_logits"], ref["img_pred"]) <= TOL
        np.testing.assert_array_equal(np.asarray(out["topk"]), ref["topk_index"])
        assert _rel(_nchw(out["masks"]), ref["masks_topk"]) <= TOL
    else:
        assert out["topk"] is None and out["img_logits"] is None
    assert out["aux"] is None  # the auxiliary head runs in training only
    logits = jax.jit(lambda v, im: model.apply(v, im, method="encode_decode"))(variables, x)
    assert logits.shape == (*x.shape[:3], N_CLS)
    if "seg_logits_img0" in ref.files:
        img0, ref0 = np.asarray(logits[0]).transpose(2, 0, 1), ref["seg_logits_img0"]
        valid = ref0 != CANVAS_FILL
        np.testing.assert_array_equal(img0 != CANVAS_FILL, valid)
        assert _rel(img0[valid], ref0[valid]) <= TOL
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), ref["seg_pred"])
