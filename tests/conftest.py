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
def torch():
    """torch, or a visible skip when it is not installed (it is optional for the package)."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def official_small(official, torch):
    """{'rankseg' | 'mask': (model, params)} loaded from the official small checkpoints."""
    from rankseg_jax.testing.official import load_small

    return {
        "rankseg": load_small(official / "rankseg_small.pth", "rankseg"),
        "mask": load_small(official / "baseline_small.pth", "mask"),
    }
