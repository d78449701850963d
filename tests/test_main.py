"""`python main.py`: every user error of every mode is one `error:` line and exit status 2.

Each case is a real subprocess (the path a user takes); each fails before any compilation, so
the whole file stays cheap.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

DEMO = "--config=configs/demo.py:runlocal"
NO_DATA = ["--config.data.generate_if_missing=False", "--config.data.root={tmp}/nowhere"]

CASES = {
    "train, unknown config key": (["--mode=train", "--config.model.widht=3"], "widht"),
    "train, class-count mismatch": (["--mode=train", "--config.model.n_cls=171"], "n_cls=171"),
    "train, missing dataset": (["--mode=train", *NO_DATA], "nowhere"),
    "eval, missing dataset": (["--mode=eval", *NO_DATA], "nowhere"),
    "eval, bad recipe arg": (["--mode=eval", "--config=configs/demo.py:head=fcn"], "head='fcn'"),
    "predict, missing input": (
        ["--mode=predict", "--config.predict.input={tmp}/none.jpg"],
        "none.jpg",
    ),
    "export, no weights": (["--mode=export"], "no checkpoint"),
    "export, bad format": (["--mode=export", "--config.export.formats=('onnx',)"], "onnx"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_exit_2(case, tmp_path):
    flags, needle = CASES[case]
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    config = [f for f in flags if f.startswith("--config=")] or [DEMO]
    rest = [f for f in flags if not f.startswith("--config=")]
    proc = subprocess.run(
        [sys.executable, "main.py", *config, f"--workdir={tmp_path / 'wd'}", *rest],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
