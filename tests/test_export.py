"""Export: Flax params → mmseg `.pth`, `.safetensors` + JSON and the official Segmenter layout.

Round trips (import → export) must give bit-identical tensors with the reference's key set and
order; an exported `.pth` must load into the PyTorch reference with strict=True and give the JAX
model's logits (tolerance 1e-5 absolute, small float32 models). Mismatching files fail with one
message naming the file and the problem.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from configs import ade20k_segmenter, coco_stuff10k
from rankseg_jax import checkpoint
from rankseg_jax.convert import augreg_npz, export, loading, mmseg
from rankseg_jax.convert import segmenter_layout as layout
from rankseg_jax.convert import torch_pickle as tp
from rankseg_jax.convert.safetensors_io import load_safetensors, save_safetensors
from rankseg_jax.data.readers import ADE20K
from rankseg_jax.errors import CheckpointError, ConfigError, UserError
from rankseg_jax.models.segmenter import create_model
from rankseg_jax.modes import export as export_mode

REPO = pathlib.Path(__file__).resolve().parents[1]
LOGIT_ATOL = 1e-5


# ------------------------------------------------------------------ helpers


def small_config(head="rankseg", width=64, depth=2, heads=2, img=64, n_cls=150, k=50, **export):
    """An ADE20K config shrunk to a tiny ViT (the official fixtures' sizes by default)."""
    config = ade20k_segmenter.get_config(f"head={head}")
    with config.unlocked():
        config.model.update(
            variant="custom", width=width, depth=depth, num_heads=heads, mlp_dim=4 * width,
            dec_heads=heads, img_size=(img, img), n_cls=n_cls,
            k=k if head == "rankseg" else n_cls,
        )  # fmt: skip
        config.eval.update(crop=(img, img), stride=(img, img))
        config.export.update(export)
    return config


def _draw(rng, path, leaf):
    """Seeded values of a sensible scale for one parameter (LN scales near 1)."""
    name = path[-1].key
    x = rng.standard_normal(leaf.shape, dtype=np.float32)
    if name == "scale":
        return 1.0 + 0.1 * x
    if name == "kernel":
        return x / math.sqrt(math.prod(leaf.shape[:-1]))
    if name in ("proj_patch", "proj_classes", "W"):
        return x / math.sqrt(leaf.shape[-1])
    if name == "b":  # RankSeg class-score bias: well spread, so the top-k has no near-ties
        return 3.0 * x
    return 0.1 * x


def random_params(config, seed=0):
    """(model, params): numpy params with the model's tree and shapes, seeded random values."""
    model = create_model(config.model)
    rng = np.random.default_rng(seed)
    abstract = loading.expected_params(model, config)
    params = jax.tree_util.tree_map_with_path(lambda p, x: _draw(rng, p, x), abstract)
    return model, params


def assert_same_state(got, want):
    """Same keys in the same order; every tensor float32, same shape and bytes."""
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == np.float32, key
        assert got[key].shape == value.shape, key
        assert got[key].tobytes() == np.ascontiguousarray(value).tobytes(), key


def assert_same_params(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def official_segmenter_keys(depth: int, dec_layers: int) -> list[str]:
    """rstrudel/segmenter `Segmenter(VisionTransformer, MaskTransformer).state_dict()` keys, in
    order: a module's own parameters first, then its children in registration order."""
    block = [
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight",
        "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
        "mlp.fc2.weight", "mlp.fc2.bias",
    ]  # fmt: skip
    keys = ["encoder.cls_token", "encoder.pos_embed"]
    keys += ["encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"]
    keys += [f"encoder.blocks.{i}.{name}" for i in range(depth) for name in block]
    keys += ["encoder.norm.weight", "encoder.norm.bias", "encoder.head.weight", "encoder.head.bias"]
    keys += ["decoder.cls_emb", "decoder.proj_patch", "decoder.proj_classes"]
    keys += [f"decoder.blocks.{i}.{name}" for i in range(dec_layers) for name in block]
    keys += ["decoder.proj_dec.weight", "decoder.proj_dec.bias"]
    keys += ["decoder.decoder_norm.weight", "decoder.decoder_norm.bias"]
    return keys + ["decoder.mask_norm.weight", "decoder.mask_norm.bias"]


def no_temporary_files(folder: pathlib.Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------ full-size key tables


def test_vit_b16_rankseg_key_table_round_trip(torch):
    """ViT-B/16 RankSeg at 512 (spec 6.2: 199 keys, 109,702,138 parameters), random values:
    import → export gives the reference's keys, shapes and order and bit-identical tensors.
    The reference model is built on torch's meta device, so it allocates nothing."""
    from rankseg_testing import torch_reference as tr

    with torch.device("meta"):
        ref = tr.build_segmenter(tr.SegmenterConfig())
    shapes = [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    assert len(shapes) == 199 and sum(math.prod(s) for _, s in shapes) == 109_702_138
    rng = np.random.default_rng(0)
    state = collections.OrderedDict(
        (k, rng.standard_normal(s, dtype=np.float32)) for k, s in shapes
    )
    config = ade20k_segmenter.get_config()
    abstract = loading.expected_params(create_model(config.model), config)
    params = mmseg.state_dict_to_params(state, abstract, source="ViT-B/16 table")
    assert_same_state(export.state_dict_for_export(params, config), state)


def test_vit_b16_baseline_segmenter_layout_key_table(torch):
    """The official layout of a ViT-B/16 baseline: exactly the official Segmenter's keys and
    shapes (1000-way encoder.head included). Zero-strided arrays: nothing is allocated."""
    from rankseg_testing import torch_reference as tr

    with torch.device("meta"):
        ref = tr.build_segmenter(tr.SegmenterConfig(head="mask", head_layers=2))
    state = collections.OrderedDict(
        (k, np.broadcast_to(np.float32(0), tuple(v.shape))) for k, v in ref.state_dict().items()
    )
    assert len(state) == 183
    official = layout.mmseg_to_segmenter(state, n_cls=150)
    assert list(official) == official_segmenter_keys(12, 2)
    assert official["encoder.head.weight"].shape == (1000, 768)
    assert official["encoder.blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert official["decoder.mask_norm.weight"].shape == (150,)
    back = layout.segmenter_to_mmseg(official)
    assert [(k, v.shape) for k, v in back.items()] == [(k, v.shape) for k, v in state.items()]


# ------------------------------------------------------------------ files, torch-free


@pytest.mark.parametrize("head", ["rankseg", "mask", "gt"])
def test_exported_files_round_trip(tmp_path, head):
    """export → both files read back (without torch) → the same tensors, keys and params."""
    config = small_config(head)
    model, params = random_params(config, seed=1)
    if tp._import_torch() is None:
        with config.unlocked():
            config.export.formats = ("safetensors",)
    written = export.export_params(params, config, tmp_path, source="test", step=3)
    state = export.state_dict_for_export(params, config)
    assert ("decode_head.mask_norm.gamma" in state) == (head == "gt")
    assert ("decode_head.ml_fc.W" in state) == (head == "rankseg")
    tensors, meta = load_safetensors(tmp_path / "model.safetensors")
    assert_same_state(tensors, state)
    assert meta == json.loads((tmp_path / "model.json").read_text())
    assert (meta["head"], meta["n_cls"], meta["k"], meta["img_size"]) == (
        head,
        150,
        config.model.k,
        [64, 64],
    )
    assert meta["class_names"] == list(ADE20K.class_names)
    assert meta["palette"] == ADE20K.palette.tolist()
    assert meta["mean"] == [127.5] * 3 and meta["sizes"]["width"] == 64 and meta["step"] == 3
    for path in written:
        if path.suffix in (".pth", ".safetensors"):
            assert_same_params(loading.load_params(path, model, config), params)
    if "pth" in config.export.formats:
        saved = tp.load_pth(tmp_path / "model.pth", use_torch=False)
        assert_same_state(saved["state_dict"], state)
        assert saved["meta"]["CLASSES"] == ADE20K.class_names
        assert saved["meta"]["PALETTE"] == ADE20K.palette.tolist() and saved["meta"]["iter"] == 3
    assert no_temporary_files(tmp_path)


def test_official_fixture_import_export_bit_identical(official, tmp_path):
    """The mmcv-written fixtures → load_params → export: the same bytes under the same keys."""
    for name, head in [("rankseg", "rankseg"), ("baseline", "mask")]:
        path = official / f"{name}_small.pth"
        config = small_config(head)
        params = loading.load_params(path, create_model(config.model), config)
        with config.unlocked():
            config.export.formats = ("safetensors",)
        export.export_params(params, config, tmp_path / name)
        original = tp.load_pth(path, use_torch=False)["state_dict"]
        assert_same_state(load_safetensors(tmp_path / name / "model.safetensors")[0], original)


def test_augreg_npz_import_export(tmp_path):
    """AugReg .npz → backbone (pos embed resized 24×24 → 4×4, spec 6.3) + given head → export:
    the backbone equals the npz conversion, the head the given params, in reference order."""
    config = small_config("mask")
    model, base = random_params(config, seed=2)
    npz = tmp_path / "B_16-fake.npz"
    np.savez(npz, **fake_augreg(np.random.default_rng(3), dim=64, heads=2, mlp=256, layers=2))
    params = loading.load_params(npz, model, config, base_params=base)
    state = export.state_dict_for_export(params, config)
    backbone = augreg_npz.augreg_npz_to_mmseg(npz, grid=(4, 4))
    head = export.state_dict_for_export(base, config)
    assert list(state) == list(head)
    for key, value in state.items():
        want = backbone[key] if key.startswith("backbone.") else head[key]
        np.testing.assert_array_equal(value, want, err_msg=key)
    assert state["backbone.pos_embed"].shape == (1, 17, 64)


def test_augreg_npz_into_an_oce_model_keeps_the_class_embeddings(tmp_path):
    """The OCE backbone's cls_emb is not in an AugReg file: it comes from the base params."""
    config = small_config("rankseg")
    with config.unlocked():
        config.model.update(oce=True, oce_start_layer=1)
    model, base = random_params(config, seed=12)
    npz = tmp_path / "B_16-fake.npz"
    np.savez(npz, **fake_augreg(np.random.default_rng(3), dim=64, heads=2, mlp=256, layers=2))
    params = loading.load_params(npz, model, config, base_params=base)
    np.testing.assert_array_equal(params["backbone"]["cls_emb"], base["backbone"]["cls_emb"])
    assert "backbone.cls_emb" in export.state_dict_for_export(params, config)


def fake_augreg(rng, dim, heads, mlp, layers, grid=24, patch=16):
    """Random arrays under the AugReg (big_vision) names and layouts."""
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    arrays = {
        "embedding/kernel": r(patch, patch, 3, dim),
        "embedding/bias": r(dim),
        "cls": r(1, 1, dim),
        "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, dim),
        "Transformer/encoder_norm/scale": r(dim),
        "Transformer/encoder_norm/bias": r(dim),
        "head/kernel": r(dim, 10),
        "head/bias": r(10),
    }
    for i in range(layers):
        base = f"Transformer/encoderblock_{i}/"
        att = base + "MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            arrays[f"{att}{name}/kernel"] = r(dim, heads, dim // heads)
            arrays[f"{att}{name}/bias"] = r(heads, dim // heads)
        arrays[att + "out/kernel"] = r(heads, dim // heads, dim)
        arrays[att + "out/bias"] = r(dim)
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{base}{ln}/scale"] = r(dim)
            arrays[f"{base}{ln}/bias"] = r(dim)
        arrays[base + "MlpBlock_3/Dense_0/kernel"] = r(dim, mlp)
        arrays[base + "MlpBlock_3/Dense_0/bias"] = r(mlp)
        arrays[base + "MlpBlock_3/Dense_1/kernel"] = r(mlp, dim)
        arrays[base + "MlpBlock_3/Dense_1/bias"] = r(dim)
    return arrays


# ------------------------------------------------------------------ PyTorch side


def well_separated_images(model, params, config, seed, margin=1e-4):
    """Images whose RankSeg top-k is not decided by float32 rounding (no near-tie at rank k)."""
    for attempt in range(20):
        rng = np.random.default_rng(seed + 100 * attempt)
        images = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
        if config.model.classifier != "rankseg":
            return images
        scores, _ = model.apply({"params": params}, jnp.asarray(images), method=model.class_scores)
        top = -np.sort(-np.asarray(scores), axis=1)[:, : config.model.k + 1]
        if np.min(top[:, :-1] - top[:, 1:]) > margin:
            return images
    raise AssertionError("no well-separated draw in 20 tries")


@pytest.mark.parametrize("head", ["rankseg", "mask", "gt"])
def test_exported_pth_loads_strictly_and_gives_the_same_logits(torch, tmp_path, head):
    """The exported model.pth in the PyTorch reference (load_state_dict(strict=True)) gives the
    JAX model's logits within 1e-5; safetensors.torch reads the same tensors."""
    from safetensors.torch import load_file

    from rankseg_testing import torch_reference as tr

    config = small_config(head)
    model, params = random_params(config, seed=4)
    export.export_params(params, config, tmp_path)
    checkpoint_ = torch.load(tmp_path / "model.pth", map_location="cpu", weights_only=True)
    state = checkpoint_["state_dict"]
    assert all(v.dtype == torch.float32 for v in state.values())
    ref = tr.build_from_state_dict(state, num_heads=2, dropout=0.0)  # strict=True inside
    assert list(ref.state_dict()) == list(state)
    from_safetensors = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(from_safetensors[k], v) for k, v in state.items())

    images = well_separated_images(model, params, config, seed=5)
    labels = None
    if head == "gt":
        rng = np.random.default_rng(6)
        classes = [3, 17, 42, 60, 77, 99, 120, 131, 149, 255]  # a LN over many classes
        labels = rng.choice(classes, size=(2, 64, 64)).astype(np.int32)
    targets = None if labels is None else torch.from_numpy(labels.astype(np.int64))
    with torch.no_grad():
        want = ref.encode_decode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), targets)
    gt = None if labels is None else jnp.asarray(labels)
    got = model.apply({"params": params}, jnp.asarray(images), gt, method=model.encode_decode)
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=LOGIT_ATOL)


def test_segmenter_layout_export_and_round_trip(torch, tmp_path):
    """An official-layout checkpoint (trained encoder.head, optimizer, n_cls, epoch) → import →
    export with export.segmenter_layout: the official key set and order, the same tensors (the
    unused encoder.head comes back as zeros), a variant.yml that load_model understands."""
    config = small_config("mask", width=128, heads=2, segmenter_layout=True)
    model, params = random_params(config, seed=7)
    official = layout.mmseg_to_segmenter(export.state_dict_for_export(params, config), n_cls=150)
    official["encoder.head.weight"] = np.ones((1000, 128), np.float32)
    original = tmp_path / "seg_small_mask" / "checkpoint.pth"
    extra = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}, "epoch": 63}
    tp.save_pth({"model": official, "n_cls": 150, **extra}, original)

    params_in = loading.load_params(original, model, config)
    assert_same_params(params_in, params)
    export.export_params(params_in, config, tmp_path / "out")
    written = tp.load_pth(tmp_path / "out" / "segmenter" / "checkpoint.pth", use_torch=False)
    assert written["n_cls"] == 150 and list(written["model"]) == official_segmenter_keys(2, 2)
    official["encoder.head.weight"] = np.zeros((1000, 128), np.float32)
    assert_same_state(written["model"], official)
    variant = yaml.safe_load((tmp_path / "out" / "segmenter" / "variant.yml").read_text())
    net = variant["net_kwargs"]
    assert (net["d_model"], net["n_heads"], net["n_layers"], net["n_cls"]) == (128, 2, 2, 150)
    assert net["image_size"] == [64, 64] and net["normalization"] == "vit"
    assert net["decoder"]["name"] == "mask_transformer" and net["decoder"]["n_layers"] == 2
    assert variant["inference_kwargs"]["window_size"] == 64


def test_segmenter_layout_normalisation_names():
    assert export.segmenter_variant(small_config("mask"))["net_kwargs"]["normalization"] == "vit"
    coco = coco_stuff10k.get_config("head=mask")
    assert export.segmenter_variant(coco)["dataset_kwargs"]["normalization"] == "deit"
    assert export.segmenter_variant(coco)["net_kwargs"]["backbone"] == "vit_base_patch16_384"


# ------------------------------------------------------------------ --mode=export


def save_orbax(workdir, config, params, steps):
    manager = checkpoint.make_manager(workdir, config)
    for step in steps:
        tree = jax.tree.map(lambda x, step=step: x + step, params)
        checkpoint.save(manager, step, tree, {"step": np.int32(step)}, {"position": step})
    manager.wait_until_finished()
    manager.close()


def test_export_mode_from_orbax_workdir(tmp_path, capsys):
    """--mode=export takes the newest orbax step of the workdir and writes to <workdir>/export."""
    formats = ("pth", "safetensors") if tp._import_torch() else ("safetensors",)
    config = small_config("rankseg", formats=formats)
    _, params = random_params(config, seed=8)
    save_orbax(tmp_path, config, params, steps=(3, 7))
    assert export_mode.run(config, str(tmp_path)) == 0
    latest = jax.tree.map(lambda x: x + 7, params)
    out = tmp_path / "export"
    tensors, meta = load_safetensors(out / "model.safetensors")
    assert_same_state(tensors, export.state_dict_for_export(latest, config))
    assert meta["step"] == 7 and meta["source"].endswith("checkpoints/7")
    if "pth" in formats:
        saved = tp.load_pth(out / "model.pth", use_torch=False)
        assert_same_state(saved["state_dict"], tensors)
        assert saved["meta"]["iter"] == 7
    assert "model.safetensors" in capsys.readouterr().out
    assert no_temporary_files(tmp_path)


def test_export_mode_from_init_from(tmp_path):
    """No checkpoint in the workdir: init_from is exported, to export.output."""
    config = small_config("mask", formats=("safetensors",))
    _, params = random_params(config, seed=9)
    source = tmp_path / "given.safetensors"
    save_safetensors(export.state_dict_for_export(params, config), source)
    with config.unlocked():
        config.init_from = str(source)
        config.export.output = str(tmp_path / "out")
    assert export_mode.run(config, str(tmp_path / "work")) == 0
    tensors, meta = load_safetensors(tmp_path / "out" / "model.safetensors")
    assert_same_state(tensors, export.state_dict_for_export(params, config))
    assert meta["source"] == str(source) and meta["step"] is None


def test_export_mode_without_weights_is_one_error_line(tmp_path):
    config = small_config("rankseg")
    with pytest.raises(UserError) as info:
        export_mode.run(config, str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and message.startswith("no checkpoint in") and "init_from" in message
    assert not (tmp_path / "export").exists()


def test_main_export_end_to_end(tmp_path):
    """python main.py --mode=export on the demo config with a safetensors init_from."""
    config = __import__("configs.demo", fromlist=["get_config"]).get_config("runlocal")
    _, params = random_params(config, seed=10)
    source = tmp_path / "demo.safetensors"
    save_safetensors(export.state_dict_for_export(params, config), source)
    command = [
        sys.executable, "main.py", "--config=configs/demo.py:runlocal", f"--workdir={tmp_path}",
        "--mode=export", f"--config.init_from={source}", "--config.export.formats=('safetensors',)",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    tensors, meta = load_safetensors(tmp_path / "export" / "model.safetensors")
    assert_same_state(tensors, export.state_dict_for_export(params, config))
    assert meta["k"] == config.model.k and meta["sizes"]["depth"] == config.model.depth


# ------------------------------------------------------------------ errors


def test_without_torch_safetensors_is_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tp, "_import_torch", lambda: None)
    config = small_config("rankseg")
    _, params = random_params(config)
    with pytest.raises(ConfigError, match=r"model.pth needs PyTorch.*model.safetensors"):
        export.export_params(params, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    assert_same_state(
        load_safetensors(tmp_path / "model.safetensors")[0],
        export.state_dict_for_export(params, config),
    )


def test_export_imports_and_runs_without_torch(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from rankseg_jax.modes import export as export_mode\n"
        "from rankseg_jax.convert import export, mmseg\n"
        "from tests.test_export import random_params, small_config\n"
        "config = small_config('mask', formats=('safetensors',))\n"
        "_, params = random_params(config)\n"
        f"print(export.export_params(params, config, {str(tmp_path)!r}))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.json").is_file()


@pytest.mark.parametrize(
    "head,overrides,message",
    [
        ("rankseg", {"formats": ("onnx",)}, r"export.formats=\('onnx',\): choose from pth"),
        ("rankseg", {"segmenter_layout": True}, "only the baseline mask head.*head='rankseg'"),
        ("gt", {"segmenter_layout": True}, "only the baseline mask head.*head='gt'"),
        ("mask", {"segmenter_layout": True}, r"encoder width 64: dec_heads=2 \(needs 1\)"),
    ],
)  # fmt: skip
def test_export_config_errors_before_writing(tmp_path, head, overrides, message):
    config = small_config(head, **overrides)
    _, params = random_params(config)
    with pytest.raises(ConfigError, match=message):
        export.export_params(params, config, tmp_path)
    assert not list(tmp_path.iterdir())


def test_segmenter_layout_needs_a_segmenter_normalisation():
    config = small_config("mask", width=128, segmenter_layout=True)
    with config.unlocked():
        config.data.mean = (120.0, 120.0, 120.0)
    with pytest.raises(ConfigError, match="only 'vit'.*and 'deit'"):
        export.check_export_config(config)


# ------------------------------------------------------------------ import mismatches


def test_training_file_with_optimizer_and_module_prefix_loads(torch, tmp_path):
    """An mmcv training checkpoint (DDP `module.` prefix, SGD momentum state) loads as is."""
    config = small_config("rankseg")
    model, params = random_params(config, seed=11)
    state = export.state_dict_for_export(params, config)
    momentum = {i: {"momentum_buffer": v * 0.5} for i, v in enumerate(state.values())}
    trained = {
        "meta": {"iter": 16000, "CLASSES": ADE20K.class_names},
        "state_dict": collections.OrderedDict(("module." + k, v) for k, v in state.items()),
        "optimizer": {"state": momentum, "param_groups": [{"lr": 1e-3, "momentum": 0.9}]},
    }
    path = tmp_path / "iter_16000.pth"
    tp.save_pth(trained, path)
    assert_same_params(loading.load_params(path, model, config), params)


def test_segmenter_layout_into_a_rankseg_config_is_refused(torch, tmp_path):
    config = small_config("mask", width=128)
    _, params = random_params(config)
    official = layout.mmseg_to_segmenter(export.state_dict_for_export(params, config), n_cls=150)
    path = tmp_path / "checkpoint.pth"
    tp.save_pth({"model": official, "n_cls": 150}, path)
    rankseg = small_config("rankseg", width=128)
    with pytest.raises(CheckpointError) as info:
        loading.load_params(path, create_model(rankseg.model), rankseg)
    assert str(path) in str(info.value)
    assert "checkpoint has a 'full' head, config model.classifier='rankseg'" in str(info.value)
    assert "official-Segmenter-layout" in str(info.value)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"img": 80}, r"backbone.pos_embed has shape \(1, 17, 64\), the model expects "
                      r"\(1, 26, 64\)"),
        ({"oce": True}, r"checkpoint has no OCE backbone class embeddings \(backbone.cls_emb\), "
                        r"config model.oce=True"),
        ({"width": 128}, r"wrong shapes: backbone.cls_token has shape \(1, 1, 64\), the model "
                         r"expects \(1, 1, 128\)"),
    ],
)  # fmt: skip
def test_other_mismatch_messages(tmp_path, change, message):
    config = small_config("mask", formats=("safetensors",))
    _, params = random_params(config)
    export.export_params(params, config, tmp_path)
    other = small_config("mask", width=change.get("width", 64), img=change.get("img", 64))
    with other.unlocked():
        other.model.oce = change.get("oce", False)
        other.model.oce_start_layer = 1 if other.model.oce else -1
    with pytest.raises(CheckpointError, match=message) as info:
        loading.load_params(tmp_path / "model.safetensors", create_model(other.model), other)
    assert "model.safetensors" in str(info.value)


def test_non_checkpoint_pth_is_a_clear_error(torch, tmp_path):
    path = tmp_path / "list.pth"
    tp.save_pth([np.zeros(3, np.float32)], path)
    config = small_config("mask")
    with pytest.raises(CheckpointError, match="not a checkpoint: a list"):
        loading.load_params(path, create_model(config.model), config)
