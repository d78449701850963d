"""UperNet Swin / BEiT through the runtime (issue #18): Segmentor, export, pretrained backbones,
training steps with BatchNorm state.

* `configs/upernet_{swin,beit}.py:runlocal` + the official family checkpoint through
  `Segmentor.from_config`: the official `seg_pred` exactly and image-0 logits within 1e-5 of
  their scale (BN running statistics used); the export (`.safetensors`, mmseg `.pth` with the
  relative position indices and BN buffers) is the official state dict again and loads back
  bit-identically;
* a public-layout classification checkpoint (Microsoft Swin `.pth` with `model`, unilm BEiT)
  given as `model.pretrained` fills the backbone of the initial variables;
* four train steps of the BEiT runlocal model (dropout, drop-path, the auxiliary loss, layer
  decay, gradient accumulation 2): finite losses that include `aux.loss_seg`, params moving on
  every second step, BN statistics moving. Its init and step compile at XLA's lowest CPU
  optimisation level (`FAST_COMPILE`): about half the default compile time, same HLO.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rankseg_jax import config as config_lib
from rankseg_jax import optim, train
from rankseg_jax import sharding as shd
from rankseg_jax.convert import export, loading, mmseg_upernet
from rankseg_jax.convert.segmenter_layout import state_dict_from_checkpoint
from rankseg_jax.convert.torch_pickle import load_pth
from rankseg_jax.models.segmenter import create_model
from rankseg_jax.segmentor import Segmentor
from rankseg_testing.scaleout import random_batches
from rankseg_testing.torch_files import write_state_dict_pth

RTOL = 1e-5
# XLA's CPU backend at its lowest optimisation level: the same HLO (same math, no fast-math),
# LLVM without its expensive passes; halves the ~20k-line train step's compile (CI time).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SPECS = {"swin": "configs/upernet_swin.py:runlocal", "beit": "configs/upernet_beit.py:runlocal"}


@pytest.mark.parametrize("backbone", ["swin", "beit"])
def test_official_checkpoint_through_segmentor_and_export(backbone, official_family, tmp_path):
    """Swin: the official logits through Segmentor (BEiT's registry forward is checked in
    test_upernet_registry.py); both: the export is the official state dict again."""
    name = f"{backbone}_upernet_rankseg"
    sd = state_dict_from_checkpoint(load_pth(official_family / f"{name}.pth"))
    seg = Segmentor.from_config(SPECS[backbone], official_family / f"{name}.pth")
    assert set(seg.model_state) == {"batch_stats"}
    if backbone == "swin":
        x = np.load(official_family / "fam_x48.npy").transpose(0, 2, 3, 1)
        ref = np.load(official_family / f"{name}_fwd_x48.npz")
        logits = np.asarray(seg.logits(x))
        np.testing.assert_array_equal(logits.argmax(-1), ref["seg_pred"])
        want = ref["seg_logits_img0"].transpose(1, 2, 0)
        err, scale = float(np.abs(logits[0] - want).max()), float(np.abs(want).max())
        assert err <= RTOL * scale, f"{err:.3g} > {RTOL} × {scale:.3g}"

    config = config_lib.load_config(SPECS[backbone])
    with config.unlocked():
        config.export.formats = ("safetensors", "pth")
    written = export.export_params(seg.params, config, tmp_path, name, 0, seg.model_state)
    assert {p.name for p in written} >= {export.MMSEG_PTH, export.SAFETENSORS}
    out = state_dict_from_checkpoint(load_pth(tmp_path / export.MMSEG_PTH))
    assert set(out) == set(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(np.asarray(out[key]), np.asarray(value), err_msg=key)
    again = Segmentor.from_config(SPECS[backbone], tmp_path / export.SAFETENSORS)
    for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(seg.variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _public_layout(backbone: str, names: dict, rng) -> dict[str, np.ndarray]:
    """A classification checkpoint of the runlocal backbone in its public key layout."""
    out = {}
    for key, value in names.items():
        if not key.startswith("backbone.") or key.endswith("relative_position_index"):
            continue
        key = key.removeprefix("backbone.")
        if backbone == "swin":
            if key.startswith("norm"):
                continue
            key = key.replace("stages.", "layers.").replace(".attn.w_msa.", ".attn.")
            key = key.replace("patch_embed.projection", "patch_embed.proj")
            key = key.replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(
                ".ffn.layers.1.", ".mlp.fc2."
            )
        elif key.startswith("fpn"):
            continue
        out[key] = rng.standard_normal(np.shape(value)).astype(np.float32)
    out["head.weight"] = np.zeros((5, 8), np.float32)
    return out


@pytest.mark.parametrize("backbone", ["swin", "beit"])
def test_pretrained_backbone_file_fills_the_initial_backbone(backbone, tmp_path):
    config = config_lib.load_config(SPECS[backbone])
    model = create_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 48, 48, 3), np.float32))
    rng = np.random.default_rng(0)  # stands for the initial variables (no compile needed)
    base = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), dict(shapes))
    names = mmseg_upernet.variables_to_state_dict(base)
    ckpt = _public_layout(backbone, names, np.random.default_rng(1))
    path = tmp_path / f"{backbone}_pretrained.pth"
    write_state_dict_pth(str(path), ckpt, key="model")
    loaded = loading.load_variables(path, model, config, base)
    got = mmseg_upernet.variables_to_state_dict(loaded)
    fresh = "backbone.norm" if backbone == "swin" else "backbone.fpn"
    want = mmseg_upernet.pretrained_backbone(ckpt, base)
    want = mmseg_upernet.variables_to_state_dict(want)
    for key, value in got.items():
        if key in want and not key.endswith("relative_position_index"):
            np.testing.assert_array_equal(value, want[key], err_msg=key)
        else:  # the heads and the fresh backbone modules keep their initial values
            assert not key.startswith("backbone.") or key.startswith(fresh) or "index" in key
            np.testing.assert_array_equal(value, names[key], err_msg=key)


def test_train_steps_with_batch_stats():
    """The BEiT runlocal row (layer decay, warm-up, gradient accumulation 2 as the recipe's
    update_interval, dropout and drop-path) through train.compile_train_step: finite losses
    with the auxiliary term, params moving on the second step only, BN statistics moving."""
    config = config_lib.load_config(SPECS["beit"])
    with config.unlocked():
        config.batch_size = 2
        config.optimizer.grad_accum_steps = 2
    mesh = shd.mesh_from_config(config, jax.devices()[:1])
    model, tx = create_model(config.model), optim.make_optimizer(config)
    state = train.create_state(config, model, tx, mesh, compiler_options=FAST_COMPILE)
    shardings = train.config_state_shardings(state, mesh, config)
    step_fn = train.compile_train_step(model, tx, config, shardings, shd.batch_sharding(mesh))
    stats0 = jax.device_get(state.model_state)["batch_stats"]
    batches = [jax.device_put(b, shd.batch_sharding(mesh)) for b in random_batches(config, 4)]
    step_fn = step_fn.lower(state, batches[0]).compile(compiler_options=FAST_COMPILE)
    moved = []
    for batch in batches:
        before = jax.device_get(state.params)
        state, metrics = step_fn(state, batch)
        assert np.isfinite(float(metrics["loss"]))
        assert 0 < float(metrics["aux.loss_seg"]) < float(metrics["loss"])
        after = jax.device_get(state.params)
        head = [bool(np.any(a != b)) for a, b in zip(
            jax.tree.leaves(before["decode_head"]), jax.tree.leaves(after["decode_head"]),
            strict=True)]  # fmt: skip
        moved.append(all(head) if any(head) else False)
    assert moved == [False, True, False, True] and bool(state.finite)
    # (Leaves inside BEiT's blocks move too, but by less than a float32 ulp at first: their
    # gradients pass through the layer scale γ = 1e-6, as in the official model.)
    stats = jax.device_get(state.model_state)["batch_stats"]
    assert all(
        bool(np.any(np.asarray(a) != np.asarray(b)))
        for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(stats), strict=True)
    )
