"""Dataset problems stop training before the model is built; the wall-clock training budget.

Issue 19: a broken val split (image without label, missing annotation folder) with periodic
evaluation on, and a train split smaller than one global batch, are one `error:` line from
main.py and exit 2 before the first step; with `eval.every_steps=0` a dataset without a usable
val split trains and says so once. `schedule.max_train_seconds` ends training at the step where
the budget runs out, evaluates and checkpoints there, and a resumed run continues identically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, tiny_train_config

from rankseg_jax import checkpoint, evaluation
from rankseg_jax import train as train_lib
from rankseg_jax.data import synthetic
from rankseg_jax.errors import ConfigError, DatasetError

TINY = [
    "--config=configs/demo.py:runlocal", "--mode=train", "--config.total_steps=2",
    "--config.data.generate_if_missing=False", "--config.data.num_workers=0",
    "--config.batch_size=2", "--config.model.width=32", "--config.model.depth=1",
    "--config.model.num_heads=1", "--config.model.dec_heads=1", "--config.model.mlp_dim=64",
    "--config.model.k=8", "--config.model.dec_layers=2", "--config.model.img_size=(32, 32)",
    "--config.data.crop_size=(32, 32)", "--config.data.img_scale=(128, 32)",
    "--config.data.test_scale=(128, 32)", "--config.eval.crop=(32, 32)",
    "--config.eval.stride=(32, 32)", "--config.eval.max_images=1",
    "--config.checkpoint.every_steps=0", "--config.checkpoint.async_save=False",
    "--config.logging.every_steps=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """4 train / 2 val generated images (64–96 px)."""
    root = tmp_path_factory.mktemp("checks")
    return synthetic.generate_ade20k(root, 4, 2, seed=0, val_seed=1, min_side=64, max_side=96)


def broken_copy(src, dst, kind: str):
    """A copy of the dataset whose val split lacks one label file or its whole label folder."""
    root = str(shutil.copytree(src, dst))
    labels = os.path.join(root, "annotations", "validation")
    if kind == "image without label":
        victim = sorted(os.listdir(labels))[0]
        os.remove(os.path.join(labels, victim))
        return root, os.path.join(root, "images", "validation", victim[:-4] + ".jpg")
    shutil.rmtree(labels)
    return root, labels


def run_main(workdir, root, *extra):
    proc = subprocess.run(
        [sys.executable, "main.py", *TINY, f"--workdir={workdir}", f"--config.data.root={root}",
         *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    return proc


def assert_one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def no_model(*args, **kwargs):
    raise AssertionError("the model was built before the dataset was checked")


@pytest.mark.parametrize("kind", ["image without label", "missing annotation folder"])
def test_broken_val_split_stops_before_training(kind, small_dataset, tmp_path, monkeypatch):
    root, named = broken_copy(small_dataset, tmp_path / "data", kind)
    proc = run_main(tmp_path / "wd", root, "--config.eval.every_steps=1")
    assert_one_error_line(proc, named)
    assert not (tmp_path / "wd" / "metrics.jsonl").exists()  # no step ran
    # In process: the same error comes before the model is built (nothing compiled).
    monkeypatch.setattr(train_lib, "create_model", no_model)
    config = tiny_train_config(root, steps=2)
    with config.unlocked():
        config.eval.every_steps = 1
    with pytest.raises(DatasetError, match=named):
        train_lib.train_and_evaluate(config, str(tmp_path / "wd2"))


def test_without_val_split_trains_when_eval_is_off(small_dataset, tmp_path):
    root, _ = broken_copy(small_dataset, tmp_path / "data", "missing annotation folder")
    proc = run_main(tmp_path / "wd", root, "--config.eval.every_steps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("no evaluation will run") == 1, proc.stderr[-3000:]
    rows = (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]
    assert "final mIoU" not in proc.stdout


def test_dataset_smaller_than_a_batch_stops_before_the_model(small_dataset, tmp_path, monkeypatch):
    proc = run_main(tmp_path / "wd", small_dataset, "--config.batch_size=8")
    train_dir = os.path.join(small_dataset, "images", "training")
    assert_one_error_line(proc, train_dir, "4 examples", "batch of 8", "batch_size")
    monkeypatch.setattr(train_lib, "create_model", no_model)
    config = tiny_train_config(str(small_dataset), steps=2)
    with config.unlocked():
        config.batch_size = 8
    with pytest.raises(DatasetError, match="fewer than one global batch of 8"):
        train_lib.train_and_evaluate(config, str(tmp_path / "wd2"))


def test_negative_budget_is_a_config_error(small_dataset, tmp_path):
    config = tiny_train_config(str(small_dataset), steps=2)
    with config.unlocked():
        config.schedule.max_train_seconds = -1.0
    with pytest.raises(ConfigError, match="schedule.max_train_seconds=-1"):
        train_lib.train_and_evaluate(config, str(tmp_path))


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_budget_ends_training_then_evaluates_and_resumes(small_dataset, tmp_path, caplog):
    config = tiny_train_config(str(small_dataset), steps=50)
    with config.unlocked():
        config.schedule.max_train_seconds = 1e-9  # spent after the first step, on any machine
        config.logging.every_steps = 1
    budgeted = tmp_path / "budget"
    with caplog.at_level(logging.INFO):
        results = train_lib.train_and_evaluate(config, str(budgeted))
    assert results is not None and 0.0 <= results["mIoU"] <= 1.0  # evaluated where it ended
    assert evaluation.results_path(budgeted, 1).exists()
    assert checkpoint.latest_step(budgeted) == 1
    assert list(losses(budgeted)) == [1]
    ended = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("training ended by")
    ]
    assert len(ended) == 1 and "schedule.max_train_seconds" in ended[0], ended
    assert "at step 1 of 50 (1 steps in this run" in ended[0], ended

    # Resume without the budget to step 3: the same losses as one uninterrupted 3-step run.
    with config.unlocked():
        config.schedule.max_train_seconds = 0.0
        config.total_steps = 3
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_lib.train_and_evaluate(config, str(budgeted))
    ended = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("training ended by")
    ]
    assert len(ended) == 1 and "step count total_steps=3" in ended[0], ended
    assert "(2 steps in this run" in ended[0], ended
    straight = tmp_path / "straight"
    train_lib.train_and_evaluate(config, str(straight))
    resumed, reference = losses(budgeted), losses(straight)
    assert list(resumed) == list(reference) == [1, 2, 3]
    np.testing.assert_allclose(list(resumed.values()), list(reference.values()), rtol=1e-6)
