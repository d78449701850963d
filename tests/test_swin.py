"""mmseg SwinTransformer (models/swin.py) against the official family fixtures (issue #18).

The fixtures' small Swin (embed 16, depths 2-2-2-2, window 7) pads at every stage on 48² and
48×80 inputs (12×12 → 14×14 windows, 6 → 7, 3 → 7, 2 → 7) and merges odd sides, so the
window padding, the shift mask on the padded map and the padded patch merging are all exercised.
Tolerance: 1e-5 of each output's scale (float32; the measured misses are ≤ 1e-6 of it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax.convert.mmseg_upernet import state_dict_to_variables, variables_to_state_dict
from rankseg_jax.convert.segmenter_layout import state_dict_from_checkpoint
from rankseg_jax.convert.swin_pretrained import swin_backbone_state
from rankseg_jax.convert.torch_pickle import load_pth
from rankseg_jax.errors import CheckpointError
from rankseg_jax.models.swin import (
    SWIN_VARIANTS,
    PatchMerging,
    SwinTransformer,
    SwinVariant,
    relative_position_index,
    shift_attention_mask,
)
from rankseg_jax.models.uper import upernet_swin

RTOL = 1e-5


def _backbone_state(path) -> dict:
    sd = state_dict_from_checkpoint(load_pth(path))
    return {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def swin_state(official_family):
    return _backbone_state(official_family / "swin_upernet_baseline.pth")


def _close(ours, ref, what: str) -> None:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, what
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= RTOL * scale, f"{what}: max |Δ| {err:.3g} > {RTOL} × {scale:.3g}"


@pytest.mark.parametrize("inputs", ["x48x80"])
def test_backbone_outputs_match_official(official_family, swin_state, inputs):
    """Strict load, then the four per-stage normed outputs (NCHW in the fixture). x48 and the
    whole UperNet on both inputs: tests/test_uper.py."""
    model = SwinTransformer(SWIN_VARIANTS["swin_test"])
    x = np.load(official_family / f"fam_{inputs}.npy").transpose(0, 2, 3, 1)
    variables = state_dict_to_variables(
        swin_state, jax.eval_shape(model.init, jax.random.key(0), x)
    )
    outs = jax.jit(model.apply)(variables, x)
    ref = np.load(official_family / f"swin_upernet_baseline_fwd_{inputs}.npz")
    for i, out in enumerate(outs):
        _close(out, ref[f"backbone_out_{i}"].transpose(0, 2, 3, 1), f"{inputs} stage {i}")


def test_relative_position_index_and_roundtrip(swin_state):
    """The computed index equals every stored buffer; export restores the state dict exactly."""
    for key, value in swin_state.items():
        if key.endswith("relative_position_index"):
            np.testing.assert_array_equal(value, relative_position_index(7), err_msg=key)
    model = SwinTransformer(SWIN_VARIANTS["swin_test"])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
    back = variables_to_state_dict(state_dict_to_variables(swin_state, shapes))
    assert set(back) == set(swin_state)
    for key, value in swin_state.items():
        np.testing.assert_array_equal(back[key], np.asarray(value), err_msg=key)


def test_wrong_window_is_refused(swin_state):
    """A checkpoint whose index is not this model's (tampered here) fails naming the key."""
    bad = dict(swin_state)
    key = "stages.0.blocks.0.attn.w_msa.relative_position_index"
    bad[key] = np.asarray(bad[key])[::-1].copy()
    model = SwinTransformer(SWIN_VARIANTS["swin_test"])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(CheckpointError, match=key):
        state_dict_to_variables(bad, shapes)


def test_shift_mask_separates_regions():
    """On a 14² padded map, window 7, shift 3: the top-left window is one region (all 0); the
    bottom-right window holds 4 regions, so a token attends only its own region's tokens."""
    mask = shift_attention_mask(14, 14, 7, 3)
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()
    last = mask[3]
    assert last[0, 0] == 0 and last[0, 48] == -100.0 and last[0, 6] == -100.0
    assert np.array_equal(last, last.T)


@pytest.mark.parametrize("head,count", [("base", 121_415_076), ("rankseg", 125_172_382)])
def test_full_size_parameter_count(head, count):
    """UperNet Swin-B (window 12) at 512², ADE20K: the official counts (official_family README),
    from shapes only (jax.eval_shape allocates nothing)."""
    model = upernet_swin(150, head)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 512, 512, 3)))
    params = shapes["params"]
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count
    backbone = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["backbone"]))
    assert backbone == 86_880_376


def test_original_swin_checkpoint_converts_to_mmseg_semantics():
    """Original Swin names → mmseg names, and the reordered merge weights compute what the
    original PatchMerging computes: cat[x(0,0), x(1,0), x(0,1), x(1,1)] → LN → Linear."""
    rng = np.random.default_rng(0)
    c, out_c = 3, 5
    w = rng.standard_normal((out_c, 4 * c)).astype(np.float32)
    gamma = rng.standard_normal(4 * c).astype(np.float32)
    beta = rng.standard_normal(4 * c).astype(np.float32)
    ckpt = {
        "patch_embed.proj.weight": np.zeros((8, 3, 4, 4)),
        "layers.0.blocks.1.attn.qkv.weight": np.zeros((24, 8)),
        "layers.0.blocks.1.attn_mask": np.zeros((4, 49, 49)),
        "layers.0.blocks.1.mlp.fc1.weight": np.zeros((32, 8)),
        "layers.0.blocks.1.mlp.fc2.bias": np.zeros(8),
        "layers.0.downsample.reduction.weight": w,
        "layers.0.downsample.norm.weight": gamma,
        "layers.0.downsample.norm.bias": beta,
        "norm.weight": np.zeros(8),
        "head.weight": np.zeros((10, 8)),
    }
    sd = swin_backbone_state(ckpt)
    assert set(sd) == {
        "backbone.patch_embed.projection.weight",
        "backbone.stages.0.blocks.1.attn.w_msa.qkv.weight",
        "backbone.stages.0.blocks.1.ffn.layers.0.0.weight",
        "backbone.stages.0.blocks.1.ffn.layers.1.bias",
        "backbone.stages.0.downsample.reduction.weight",
        "backbone.stages.0.downsample.norm.weight",
        "backbone.stages.0.downsample.norm.bias",
    }
    x = rng.standard_normal((2, 4, 6, c)).astype(np.float32)
    cat = np.concatenate(
        [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1
    )
    mu, var = cat.mean(-1, keepdims=True), cat.var(-1, keepdims=True)
    want = (((cat - mu) / np.sqrt(var + 1e-5)) * gamma + beta) @ w.T
    prefix = "backbone.stages.0.downsample."
    variables = {
        "params": {
            "norm": {"scale": sd[prefix + "norm.weight"], "bias": sd[prefix + "norm.bias"]},
            "reduction": {"kernel": sd[prefix + "reduction.weight"].T},
        }
    }
    got, hw = PatchMerging(out_c).apply(variables, x.reshape(2, 24, c), (4, 6))
    assert hw == (2, 3)
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def test_remat_changes_nothing_but_memory():
    """remat=True (per-block checkpointing) gives the same outputs and gradients, to float32
    reassociation (1e-5 of each gradient's scale), on a two-stage Swin with shifted windows."""
    variant = SwinVariant(8, (2, 2), (1, 2), 7)
    x = np.random.default_rng(1).standard_normal((1, 28, 28, 3)).astype(np.float32)
    params = jax.jit(SwinTransformer(variant).init)(jax.random.key(0), x)["params"]
    results = []
    for remat in (False, True):
        model = SwinTransformer(variant, remat=remat)

        def loss(p, model=model):
            return sum(jnp.sum(o**2) for o in model.apply({"params": p}, x))

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (v0, g0), (v1, g1) = results
    assert float(v0) == pytest.approx(float(v1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
