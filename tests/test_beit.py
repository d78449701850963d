"""unilm BEiT seg backbone (models/beit.py), UperNet-BEiT eval parity and the layer-wise lr decay.

Fixtures: the official family's small BEiT (img 48, patch 16, embed 32, depth 4, 2 heads, layer
scale, rel-pos bias, out_indices 0-3; README). Tolerance: 1e-5 of each tensor's scale (float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax.convert.beit_pretrained import (
    beit_backbone_state,
    geometric_ratio,
    interpolate_rel_pos_table,
)
from rankseg_jax.convert.mmseg_upernet import state_dict_to_variables, variables_to_state_dict
from rankseg_jax.convert.segmenter_layout import state_dict_from_checkpoint
from rankseg_jax.convert.torch_pickle import load_pth
from rankseg_jax.layer_decay import adamw_layer_decay, layer_decay_tree
from rankseg_jax.models.beit import BEIT_VARIANTS, BEiT, relative_position_index
from rankseg_jax.models.segmenter import scatter_to_classes
from rankseg_jax.models.uper import inference_logits, small_upernet, upernet_beit

RTOL = 1e-5


def _close(ours, ref, what: str) -> None:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, f"{what}: {ours.shape} vs {ref.shape}"
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= RTOL * scale, f"{what}: max |Δ| {err:.3g} > {RTOL} × {scale:.3g}"


@pytest.fixture(scope="module")
def states(official_family):
    return {
        head: state_dict_from_checkpoint(load_pth(official_family / f"beit_upernet_{head}.pth"))
        for head in ("baseline", "rankseg")
    }


@pytest.fixture(scope="module")
def x48(official_family):
    return np.load(official_family / "fam_x48.npy").transpose(0, 2, 3, 1)


def test_backbone_outputs_match_official(official_family, states, x48):
    """Strict load of the backbone keys; the fpn1-fpn4 outputs at strides 4/8/16/32."""
    sd = {k[9:]: v for k, v in states["baseline"].items() if k.startswith("backbone.")}
    model = BEiT(BEIT_VARIANTS["beit_test"])
    variables = state_dict_to_variables(sd, jax.eval_shape(model.init, jax.random.key(0), x48))
    outs = jax.jit(model.apply)(variables, x48)
    ref = np.load(official_family / "beit_upernet_baseline_fwd_x48.npz")
    for i, out in enumerate(outs):
        _close(out, ref[f"backbone_out_{i}"].transpose(0, 2, 3, 1), f"out {i}")
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            np.testing.assert_array_equal(value, relative_position_index((3, 3)), err_msg=key)
    back = variables_to_state_dict(variables)
    assert set(back) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(back[key], np.asarray(value), err_msg=key)


def test_other_input_size_is_refused(x48):
    model = BEiT(BEIT_VARIANTS["beit_test"])
    with pytest.raises(ValueError, match="48"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize("head", ["baseline", "rankseg"])
def test_upernet_eval_matches_official(official_family, states, x48, head):
    """Whole-image encode_decode in eval mode: backbone, head output (RankSeg: the −100 canvas),
    top-k exact, rank-slot masks, image-level logits, resized logits of image 0, seg_pred exact."""
    model = small_upernet("beit", "rankseg" if head == "rankseg" else "base")
    shapes = jax.eval_shape(model.init, jax.random.key(0), x48)
    variables = state_dict_to_variables(states[head], shapes)
    out, full = jax.jit(lambda v, x: _with_logits(model, model.apply(v, x), x))(variables, x48)
    ref = np.load(official_family / f"beit_upernet_{head}_fwd_x48.npz")
    for i in range(4):
        _close(out["features"][i], ref[f"backbone_out_{i}"].transpose(0, 2, 3, 1), f"bb {i}")
    logits = out["masks"]
    if head == "rankseg":
        np.testing.assert_array_equal(np.asarray(out["topk"]), ref["topk_index"])
        _close(out["img_logits"], ref["img_pred"], "img_pred")
        _close(out["masks"], ref["masks_topk"].transpose(0, 2, 3, 1), "masks_topk")
        logits = scatter_to_classes(out["masks"], out["topk"], 150)
    _close(logits, ref["seg_logits_feat"].transpose(0, 2, 3, 1), "seg_logits_feat")
    _close(full[0], ref["seg_logits_img0"].transpose(1, 2, 0), "seg_logits_img0")
    np.testing.assert_array_equal(np.asarray(full.argmax(-1)), ref["seg_pred"])


@pytest.mark.parametrize("head,count", [("base", 441_271_084), ("rankseg", 455_228_454)])
def test_full_size_parameter_count(head, count):
    """UperNet BEiT-L/16 640, ADE20K: the official counts, from shapes only."""
    model = upernet_beit(150, head)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 640, 640, 3)))
    params = shapes["params"]
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["backbone"])) == 318_108_160


def _with_logits(model, out, x):
    return out, inference_logits(out, x.shape[1:3], model.n_cls)


def _official_group(name: str, shape: tuple, depth: int, rate: float, wd: float):
    """The fork's LayerDecayOptimizerConstructor.add_params, written out independently."""
    num_layers = depth + 2
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        layer_id = 0
    elif name.startswith("backbone.patch_embed"):
        layer_id = 0
    elif name.startswith("backbone.blocks"):
        layer_id = int(name.split(".")[2]) + 1
    else:
        layer_id = num_layers - 1
    if len(shape) == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"):
        this_wd = 0.0
    else:
        this_wd = wd
    return rate ** (num_layers - layer_id - 1), this_wd


def test_layer_decay_groups_and_step_match_official(states, x48, torch):
    """Every parameter of the small BEiT UperNet + RankSeg gets the official (lr scale, wd);
    one AdamW step with those groups equals torch.optim.AdamW's on the same grads."""
    depth, rate, wd, lr = 4, 0.95, 0.05, 2e-5
    model = small_upernet("beit", "rankseg")
    variables = state_dict_to_variables(
        states["rankseg"], jax.eval_shape(model.init, jax.random.key(0), x48)
    )
    params = variables["params"]
    groups = layer_decay_tree(params, depth, rate, wd)
    ours_scale = variables_to_state_dict({"params": groups["lr_scale"]})
    ours_wd = variables_to_state_dict({"params": groups["weight_decay"]})
    names = [k for k in ours_scale if not k.endswith("relative_position_index")]
    official = {
        k: _official_group(k, np.shape(states["rankseg"][k]), depth, rate, wd) for k in names
    }
    assert {k: (ours_scale[k].item(), ours_wd[k].item()) for k in names} == pytest.approx(
        official, rel=1e-12
    )
    # The rules separate at least: no-decay 1-D, decaying cls_token, per-block scales, heads.
    assert official["backbone.cls_token"] == pytest.approx((rate**5, wd))
    assert official["backbone.blocks.2.gamma_1"] == pytest.approx((rate**2, 0.0))
    assert official["decode_head.img_cls_head.fc.W"] == pytest.approx((1.0, wd))

    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    tx = adamw_layer_decay(lr, groups)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    ours = variables_to_state_dict({"params": updates})

    # torch in float64 on the same float32 values: its update is exact to ~1e-16.
    sd_params = variables_to_state_dict({"params": params})
    sd_grads = variables_to_state_dict({"params": grads})
    tensors = {
        k: torch.tensor(np.asarray(sd_params[k], np.float64), requires_grad=True) for k in names
    }
    by_group: dict = {}
    for k in names:
        by_group.setdefault(official[k], []).append(tensors[k])
    opt = torch.optim.AdamW(
        [{"params": v, "lr": s * lr, "weight_decay": d} for (s, d), v in by_group.items()],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    for k in names:
        tensors[k].grad = torch.tensor(np.asarray(sd_grads[k], np.float64))
    opt.step()
    for k in names:
        delta = tensors[k].detach().numpy() - np.asarray(sd_params[k], np.float64)
        err = np.abs(np.asarray(ours[k], np.float64) - delta).max()
        assert err <= 1e-5 * np.abs(delta).max(), f"{k}: update off by {err:.3g}"


def test_rel_pos_table_interpolation_reproduces_cubics():
    """The bicubic interpolating spline through the geometric offsets reproduces any bicubic
    polynomial of the offsets exactly, so a table holding one must come back as that polynomial
    at the new integer offsets; the 3 cls rows are kept; an equal size is the identity."""
    src, dst = 27, 79  # BEiT-L pretraining 224/16 = 14 → 2·14−1; 640/16 = 40 → 2·40−1
    half = src // 2
    q = geometric_ratio(half, dst // 2)
    dis = np.cumsum([1.0] + [q ** (i + 1) for i in range(half - 1)])
    coords = np.concatenate([-dis[::-1], [0.0], dis])

    def poly(a, b):
        return 0.3 * a - 0.2 * b + 0.01 * a * b + 1e-3 * a**3 - 2e-4 * b**2 * a

    grid = poly(coords[:, None], coords[None, :])
    table = np.concatenate([np.stack([grid.ravel(), -grid.ravel()], 1), np.ones((3, 2))])
    out = interpolate_rel_pos_table(table.astype(np.float32), dst)
    assert out.shape == (dst * dst + 3, 2)
    t = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
    want = poly(t[:, None], t[None, :]).ravel()
    scale = np.abs(want).max()
    assert np.abs(out[:-3, 0] - want).max() <= 1e-5 * scale
    assert np.abs(out[:-3, 1] + want).max() <= 1e-5 * scale
    np.testing.assert_array_equal(out[-3:], 1.0)
    np.testing.assert_array_equal(interpolate_rel_pos_table(out, dst), out)


def test_pretrained_state_shares_table_and_drops_classifier():
    table = np.zeros((27 * 27 + 3, 2), np.float32)
    ckpt = {
        "cls_token": np.zeros((1, 1, 4)),
        "rel_pos_bias.relative_position_bias_table": table,
        "blocks.0.attn.q_bias": np.zeros(4),
        "head.weight": np.zeros((10, 4)),
        "norm.weight": np.zeros(4),
    }
    out = beit_backbone_state(ckpt, depth=2, grid=(40, 40))
    assert set(out) == {
        "backbone.cls_token",
        "backbone.blocks.0.attn.q_bias",
        "backbone.blocks.0.attn.relative_position_bias_table",
        "backbone.blocks.1.attn.relative_position_bias_table",
    }
    assert out["backbone.blocks.1.attn.relative_position_bias_table"].shape == (79 * 79 + 3, 2)
