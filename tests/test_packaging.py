"""The package installs like one: pyproject.toml's dependencies are requirements.txt, the
extras match requirements-dev.txt, and `pip install .` into a fresh venv imports and runs from
outside the repository."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirements(name: str) -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [s for s in (line.split("#")[0].strip() for line in lines) if s]


def test_dependencies_come_from_requirements_txt():
    """requirements.txt is the one list: pyproject reads it, and it holds nothing pip -r only."""
    project = PYPROJECT["project"]
    assert project["dynamic"] == ["dependencies"] and "dependencies" not in project
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"] == {
        "file": ["requirements.txt"]
    }
    runtime = _requirements("requirements.txt")
    assert "jax>=0.10.2" in runtime and not [r for r in runtime if r.startswith("-")]


def test_extras_match_requirements_dev():
    extras = PYPROJECT["project"]["optional-dependencies"]
    dev = _requirements("requirements-dev.txt")
    assert dev[0] == "-r requirements.txt"
    assert extras["dev"] == dev[1:]
    torch_pin = [r for r in dev if r.startswith("torch")]
    assert extras["torch"] == torch_pin == ["torch==2.13.0"]
    assert extras["cuda"] == ["jax[cuda12]"] and extras["tpu"] == ["jax[tpu]"]


@pytest.mark.install
def test_fresh_venv_install_imports_and_runs_outside_the_repo(tmp_path):
    """`pip install .` into a venv that sees the system's packages (so nothing is downloaded:
    --no-index), then from another directory: import, Segmentor.from_config on a config file,
    and `python -m rankseg_jax` (a bad launch flag: the CLI's one-line error, exit 2)."""
    source, venv, elsewhere = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("rankseg_jax", "configs"):  # a copy: pip builds in-tree, the repo stays clean
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, source / name)
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(JAX_PLATFORMS="cpu", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    script = (
        "import importlib.metadata, pathlib, rankseg_jax\n"
        "assert 'jax>=0.10.2' in importlib.metadata.requires('rankseg_jax')\n"
        "print(pathlib.Path(rankseg_jax.__file__).resolve())\n"
        f"seg = rankseg_jax.Segmentor.from_config({str(REPO / 'configs' / 'demo.py')!r})\n"
        "print(seg.num_params)\n"
    )
    proc = subprocess.run(
        [python, "-c", script], cwd=elsewhere, capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    location, num_params = proc.stdout.strip().splitlines()[-2:]
    assert pathlib.Path(location).is_relative_to(venv.resolve())  # the installed copy
    assert int(num_params) > 100_000  # the demo's ViT (width 128, depth 4) and decoder
    cli = subprocess.run(
        [python, "-m", "rankseg_jax", f"--config={REPO / 'configs' / 'demo.py'}",
         f"--workdir={tmp_path / 'w'}", "--num_processes=2"],
        cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 2, cli.stderr[-3000:]
    assert (venv / "bin" / "rankseg-jax").exists()  # the console script of the same CLI
    assert cli.stderr.strip().splitlines()[-1].startswith("error: num_processes=2 needs")
