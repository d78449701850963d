"""Shared fixtures: the official PyTorch outputs and lazily imported torch."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def fixtures_path() -> pathlib.Path:
    """Where the official fixtures live ($RANKSEG_FIXTURES, default ../shared/fixtures/official)."""
    default = REPO.parent / "shared" / "fixtures" / "official"
    return pathlib.Path(os.environ.get("RANKSEG_FIXTURES", default))


@pytest.fixture(scope="session")
def official() -> pathlib.Path:
    """The official fixtures folder; fails under CI=true when missing, skips visibly elsewhere."""
    path = fixtures_path()
    if not (path / "README.md").exists():
        message = f"official fixtures not found at {path} (set RANKSEG_FIXTURES)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def official_family() -> pathlib.Path:
    """The conv-head family fixtures (DeepLabV3, UperNet-Swin, UperNet-BEiT), next to `official`.

    $RANKSEG_FAMILY_FIXTURES, default ../shared/fixtures/official_family; like `official`, fails
    under CI=true when missing and skips visibly elsewhere.
    """
    default = REPO.parent / "shared" / "fixtures" / "official_family"
    path = pathlib.Path(os.environ.get("RANKSEG_FAMILY_FIXTURES", default))
    if not (path / "README.md").exists():
        message = f"family fixtures not found at {path} (set RANKSEG_FAMILY_FIXTURES)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def torch():
    """torch, or a visible skip when it is not installed (it is optional for the package)."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def official_small(official, torch):
    """{'rankseg' | 'mask': (model, params)} loaded from the official small checkpoints."""
    from rankseg_testing.official import load_small

    return {
        "rankseg": load_small(official / "rankseg_small.pth", "rankseg"),
        "mask": load_small(official / "baseline_small.pth", "mask"),
    }


@pytest.fixture(scope="session")
def synthetic_ade(tmp_path_factory):
    """A small generated ADE20K-format dataset (24 train / 6 val images, 64–128 px sides)."""
    from rankseg_jax.data import synthetic

    root = tmp_path_factory.mktemp("synthetic_ade")
    return synthetic.generate_ade20k(root, 24, 6, seed=0, val_seed=1, min_side=64, max_side=128)


@pytest.fixture(scope="session")
def compile_cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment for `main.py` subprocesses that share one persistent JAX compilation cache.

    Several runs of the same tiny config (straight, killed, restarted) compile the same
    programs; with the cache only the first pays for XLA (measured: a 30-step tiny run 209 s →
    91 s on the loaded 2-core machine). Only for subprocesses whose tests do not count
    compilations: a cache hit is not a backend compilation (inference.count_compilations).
    """
    cache = tmp_path_factory.mktemp("jax_compilation_cache")
    return dict(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def tiny_train_config(data_root: str, steps: int = 12):
    """The demo's smoke config shrunk further for tests (a 1-layer ViT at 32 px)."""
    from configs import demo

    config = demo.get_config("runlocal")
    with config.unlocked():
        config.total_steps = steps
        config.batch_size = 2
        config.model.update(width=32, depth=1, num_heads=1, mlp_dim=64, dec_heads=1, k=8)
        config.model.update(img_size=(32, 32), dec_layers=2)
        config.data.update(root=data_root, crop_size=(32, 32), img_scale=(128, 32))
        config.data.update(test_scale=(128, 32), num_workers=0, generate_if_missing=False)
        config.eval.update(crop=(32, 32), stride=(32, 32), max_images=2, every_steps=0)
        config.checkpoint.update(every_steps=0, async_save=False)
        config.logging.every_steps = 0
    return config
