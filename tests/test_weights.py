"""The weights registry: names, URLs, resolve(), the CLI, and AugReg through the registry."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax import checkpoint, train, weights
from rankseg_jax import config as configuration
from rankseg_jax.convert import loading
from rankseg_jax.errors import UserError
from rankseg_jax.models.segmenter import create_model
from rankseg_testing.file_server import FileServer
from rankseg_testing.official import small_config
from tests.test_augreg_npz import _fake_augreg

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKSEG_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RANKSEG_JAX_OFFLINE", raising=False)
    monkeypatch.delenv("RANKSEG_JAX_WEIGHTS_BASE_URL", raising=False)
    return tmp_path / "cache"


def test_every_release_file_of_the_checkpoint_docs_has_a_name():
    docs = (REPO / "docs" / "checkpoints.md").read_text()
    stems = set(re.findall(r"`(segmenter_[a-z0-9_]+)\.pth`", docs))
    assert len(stems) >= 13
    for stem in stems:
        entry = weights.get(stem)
        assert entry.format == "mmseg_pth"
        assert entry.url == (
            f"https://github.com/openseg-group/RankSeg/releases/download/v1.0.2/{stem}.pth"
        )
    assert weights.get("seg_large_mask_640").url.endswith("seg_large_mask_640/checkpoint.pth")


def test_augreg_entries_are_the_official_config_files():
    """The file names the official segmenter_vit-b16 / vit-l16 configs set as `pretrained`."""
    base = "https://storage.googleapis.com/vit_models/augreg/"
    b16 = weights.get("augreg_vit_b16_384")
    l16 = weights.get("augreg_vit_l16_384")
    assert b16.url == base + (
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-"
        "lr_0.01-res_384.npz"
    )
    assert l16.url == base + (
        "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-"
        "lr_0.01-res_384.npz"
    )
    assert b16.format == l16.format == "augreg_npz"
    assert b16.filename.endswith(".npz") and l16.filename.endswith(".npz")


def test_names_and_cache_file_names_are_unique_and_keep_the_suffix():
    entries = [weights.get(n) for n in weights.names()]
    assert len({e.filename for e in entries}) == len(entries)
    for entry in entries:
        assert pathlib.PurePosixPath(entry.filename).suffix in (".pth", ".npz")
        assert entry.format in weights.FORMATS
    for name in ("resnet101_v1c", "swin_base_patch4_window12_384_22k"):
        assert weights.get(name).format == "torch_pth"
    assert weights.get("beit_large_patch16_224_pt22k_ft22k").url.endswith(
        "beit_large_patch16_224_pt22k_ft22k.pth"
    )


def test_base_url_override(cache, monkeypatch):
    entry = weights.get("augreg_vit_b16_384")
    assert weights.url_of(entry) == entry.url
    monkeypatch.setenv("RANKSEG_JAX_WEIGHTS_BASE_URL", "http://127.0.0.1:9/mirror/")
    assert weights.url_of(entry) == "http://127.0.0.1:9/mirror/" + entry.filename


def test_resolve_name_url_path_and_unknown(cache, tmp_path, monkeypatch):
    entry = weights.get("segmenter_vitb_ade20k_rankseg")
    data = b"\x80\x02fake checkpoint bytes" * 1000
    with FileServer({"/" + entry.filename: data, "/other/x.pth": data[:100]}) as server:
        monkeypatch.setenv("RANKSEG_JAX_WEIGHTS_BASE_URL", server.base_url)
        by_name = weights.resolve("segmenter_vitb_ade20k_rankseg", progress=False)
        assert by_name == cache / entry.filename == weights.cached_path(entry.name)
        assert by_name.read_bytes() == data
        by_url = weights.resolve(server.url("/other/x.pth"), progress=False)
        assert by_url.parent == cache and by_url.name.endswith("-x.pth")
        assert by_url.read_bytes() == data[:100]
        assert server.gets["/" + entry.filename] == 1
    local = tmp_path / "mine.pth"
    local.write_bytes(b"x")
    assert weights.resolve(str(local)) == local
    with pytest.raises(weights.UnknownWeightsError, match="not a registered name") as info:
        weights.resolve("augreg_vit_b17_384")
    assert "\n" not in str(info.value)


def _params(path, config, base):
    return loading.load_params(path, create_model(config.model), config, base_params=base)


def test_augreg_npz_through_the_registry_equals_loading_the_path(cache, tmp_path, monkeypatch):
    """load_params('augreg_vit_b16_384') (fetched by name) equals load_params(the file's path)."""
    entry = weights.get("augreg_vit_b16_384")
    npz = tmp_path / "local.npz"
    np.savez(npz, **_fake_augreg(seed=3))
    config = small_config("rankseg")
    model = create_model(config.model)
    base = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
    with FileServer({"/" + entry.filename: npz.read_bytes()}) as server:
        monkeypatch.setenv("RANKSEG_JAX_WEIGHTS_BASE_URL", server.base_url)
        by_name = _params("augreg_vit_b16_384", config, base)  # as model.pretrained=NAME does
        assert server.gets["/" + entry.filename] == 1
    resolved = weights.cached_path("augreg_vit_b16_384")
    assert resolved.suffix == ".npz" and resolved.read_bytes() == npz.read_bytes()
    by_path = _params(npz, config, base)
    flat_name = jax.tree_util.tree_flatten_with_path(by_name)[0]
    flat_path = jax.tree_util.tree_flatten_with_path(by_path)[0]
    assert [k for k, _ in flat_name] == [k for k, _ in flat_path]
    for (key, a), (_, b) in zip(flat_name, flat_path, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(key))
    # the backbone really came from the file (not the random init), the head from `base`
    cls = np.asarray(by_name["backbone"]["cls_token"]).reshape(-1)
    np.testing.assert_array_equal(cls, _fake_augreg(seed=3)["cls"].reshape(-1))
    assert not np.array_equal(cls, np.asarray(base["backbone"]["cls_token"]).reshape(-1))


def test_cli_lists_names_and_fetch_reports_one_line(cache):
    env = {"RANKSEG_JAX_CACHE": str(cache), "RANKSEG_JAX_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env = {**os.environ, **env}
    listed = subprocess.run(
        [sys.executable, "-m", "rankseg_jax.weights"], cwd=REPO, env=env,
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for name in weights.names():
        assert re.search(rf"^{name}\s", listed.stdout, re.MULTILINE), name
    fetched = subprocess.run(
        [sys.executable, "-m", "rankseg_jax.weights", "fetch", "augreg_vit_l16_384"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert fetched.returncode == 2
    lines = fetched.stderr.strip().splitlines()
    assert len(lines) == 1 and str(weights.cached_path("augreg_vit_l16_384")) in lines[0]


def test_readme_reproduce_table_uses_registered_names_and_valid_configs():
    """Every row of README "Reproduce a row": its config builds, START/RELEASE are names."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Reproduce a row", 1)[1]
    rows = re.findall(r"^\| [^|]+ \| `configs/([a-z0-9_]+)\.py:?([^`]*)` \| `(\w+)` \|"
                      r"[^|]+\|[^|]+\| ([^|]+) \|", section, re.MULTILINE)  # fmt: skip
    assert len(rows) == 14
    for module, arg, start, release in rows:
        config = importlib.import_module(f"configs.{module}").get_config(arg or None)
        assert weights.get(start).format == "augreg_npz"
        assert ("L_16" in weights.get(start).url) == (config.model.variant == "L/16")
        names = re.findall(r"`(\w+)`", release)
        for name in names:
            entry = weights.get(name)
            assert entry.config.startswith(f"configs/{module}.py"), (name, entry.config)
            assert entry.config.removeprefix(f"configs/{module}.py").lstrip(":") == arg
    commands = section.split("```bash", 1)[1].split("```", 1)[0]
    for name in re.findall(r"(?:pretrained|init_from|fetch)[= ](\w+)", commands):
        weights.get(name)


# ------------------------------------------------- paper rows start from their AugReg backbone


def test_paper_rows_default_to_augreg_and_smoke_runs_to_none():
    """Every paper row names its official AugReg file; runlocal and the demo start from scratch."""
    for module in ("ade20k_segmenter", "coco_stuff10k", "pascal_context", "ade20k_full"):
        recipe = importlib.import_module(f"configs.{module}")
        for variant in ("B/16", "L/16") if module in ("ade20k_segmenter", "coco_stuff10k") else ():
            config = recipe.get_config(f"variant={variant}")
            expected = "augreg_vit_l16_384" if variant == "L/16" else "augreg_vit_b16_384"
            assert config.model.pretrained == expected, (module, variant)
        config = recipe.get_config(None)
        assert weights.get(config.model.pretrained).format == "augreg_npz"
        assert ("L_16" in weights.url_of(weights.get(config.model.pretrained))) == (
            config.model.variant == "L/16"
        )
        assert recipe.get_config("runlocal").model.pretrained == "none", module
    assert importlib.import_module("configs.demo").get_config("runlocal").model.pretrained == "none"
    assert importlib.import_module("configs.demo").get_config(None).model.pretrained == "none"


def _tiny_paper_row(data_root, workdir_steps: int = 1, **model):
    """configs/ade20k_segmenter.py (the paper row, its pretrained default kept) with an AugReg-
    shaped tiny ViT (D=64, 2 heads, 2 blocks, patch 16, 32 px) and one training step."""
    config = configuration.load_config("configs/ade20k_segmenter.py")
    with config.unlocked():
        config.total_steps = workdir_steps
        config.batch_size = 2
        config.model.update(
            variant="custom", width=64, depth=2, num_heads=2, mlp_dim=256, dec_heads=2,
            img_size=(32, 32), k=8, dec_layers=2, drop_path_rate=0.0, **model,
        )  # fmt: skip
        config.data.update(root=str(data_root), crop_size=(32, 32), img_scale=(128, 32))
        config.data.update(test_scale=(128, 32), num_workers=0, generate_if_missing=False)
        config.eval.update(crop=(32, 32), stride=(32, 32), max_images=2, every_steps=0)
        config.checkpoint.every_steps = 0
        config.logging.every_steps = 1
    return config


def test_paper_row_without_weights_stops_with_one_line_before_compiling(
    cache, synthetic_ade, tmp_path, monkeypatch
):
    """Offline, augreg_vit_b16_384 not cached, no pretrained=none: one UserError line naming
    the file, where to put it and the way to train from scratch; nothing built or compiled."""
    monkeypatch.setenv("RANKSEG_JAX_OFFLINE", "1")
    config = _tiny_paper_row(synthetic_ade)
    assert config.model.pretrained == "augreg_vit_b16_384"

    def no_compile(*args, **kwargs):
        raise AssertionError("the model was built before the weights were resolved")

    monkeypatch.setattr(train, "create_model", no_compile)
    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(UserError) as info:
        train.train_and_evaluate(config, str(tmp_path / "wd"))
    message = str(info.value)
    assert "\n" not in message
    assert "model.pretrained=augreg_vit_b16_384" in message
    assert weights.url_of(weights.get("augreg_vit_b16_384")) in message
    assert str(weights.cached_path("augreg_vit_b16_384")) in message
    assert "--config.model.pretrained=none" in message
    assert not (tmp_path / "wd" / "provenance.json").exists()


def test_paper_row_with_none_trains_from_random_init(cache, synthetic_ade, tmp_path, monkeypatch):
    """pretrained=none (explicit) starts without any file; provenance.json says random init."""
    monkeypatch.setenv("RANKSEG_JAX_OFFLINE", "1")
    config = _tiny_paper_row(synthetic_ade, pretrained="none")
    train.train_and_evaluate(config, str(tmp_path / "wd"))
    saved = json.loads((tmp_path / "wd" / "provenance.json").read_text())
    assert saved[-1]["weights"] == f"random init (seed {config.seed})"
    assert saved[-1]["weights_sha256"] is None


def test_paper_row_loads_its_backbone_by_name_and_records_its_sha256(
    cache, synthetic_ade, tmp_path, monkeypatch
):
    """model.pretrained=augreg_vit_b16_384 (the default) served by the local server: the run
    loads it, provenance.json names it with the file's sha256, the backbone is the file's."""
    entry = weights.get("augreg_vit_b16_384")
    arrays = _fake_augreg(seed=5)
    npz = tmp_path / "b16.npz"
    np.savez(npz, **arrays)
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    config = _tiny_paper_row(synthetic_ade)
    with config.unlocked():
        config.optimizer.lr = 0.0  # one step that leaves the loaded weights as they were
    with FileServer({"/" + entry.filename: npz.read_bytes()}) as server:
        monkeypatch.setenv("RANKSEG_JAX_WEIGHTS_BASE_URL", server.base_url)
        train.train_and_evaluate(config, str(tmp_path / "wd"))
        assert server.gets["/" + entry.filename] == 1
    saved = json.loads((tmp_path / "wd" / "provenance.json").read_text())
    assert saved[-1]["weights_sha256"] == digest
    assert "augreg_vit_b16_384" in saved[-1]["weights"] and digest in saved[-1]["weights"]
    model = create_model(config.model)
    abstract = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
        gt_labels=jnp.zeros((1, 32, 32), jnp.int32),
    )["params"]  # fmt: skip
    params = checkpoint.restore_params(tmp_path / "wd", abstract)
    cls = np.asarray(params["backbone"]["cls_token"]).reshape(-1)
    np.testing.assert_array_equal(cls, arrays["cls"].reshape(-1))
