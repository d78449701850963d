"""The demo learns: `main.py --config=configs/demo.py:runlocal` as a newcomer runs it.

One ≤ 3-minute run (data generation, compilation, training and evaluation) in a subprocess,
on a validation split generated with another seed than the training split (and than the
demo's default val seed), then three checks (issue 5, "Demo"):

* the training loss falls: mean of the last 20 logged steps ≤ 0.7 × the mean of the first 20;
* the trained mIoU is ≥ 5 × the untrained (seeded random) model's mIoU on the same images;
* the trained mIoU is ≥ the majority-class baseline's mIoU + 0.10 (fractions, i.e. 10 points);
  the baseline predicts the most frequent class of the training labels everywhere.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from configs import demo as demo_config
from rankseg_jax import config as common
from rankseg_jax import evaluation, metrics
from rankseg_jax.data.sources import source_from_config
from rankseg_jax.segmentor import Segmentor

VAL_SEED = 7  # neither the training seed (0) nor the demo's default validation seed (1)
LOSS_RATIO = 0.7  # last-20 mean loss ≤ 0.7 × first-20 mean loss
UNTRAINED_FACTOR = 5.0  # trained mIoU ≥ 5 × untrained mIoU
MAJORITY_MARGIN = 0.10  # trained mIoU ≥ majority-class mIoU + 0.10


def demo_overrides(workdir, data_root) -> list[str]:
    return [
        f"--workdir={workdir}",
        f"--config.data.root={data_root}",
        f"--config.data.synthetic_val_seed={VAL_SEED}",
        "--config.logging.every_steps=1",  # one metrics.jsonl line per step
    ]


def demo_config_for_test(data_root):
    """The runlocal demo config with the test's overrides (what the subprocess runs)."""
    config = demo_config.get_config("runlocal").unlock()
    config.data.root = str(data_root)
    config.data.synthetic_val_seed = VAL_SEED
    config.logging.every_steps = 1
    config.lock()
    return config


def majority_class_miou(train_source, val_source, n_cls: int, ignore_index: int) -> float:
    """mIoU of predicting the training split's most frequent class on every val pixel."""
    hist = np.zeros(n_cls, np.int64)
    for i in range(len(train_source)):
        label = train_source[i]["label"]
        hist += np.bincount(label[label != ignore_index].ravel(), minlength=n_cls)[:n_cls]
    majority = int(np.argmax(hist))
    counts = np.zeros((3, n_cls), np.int64)
    for i in range(len(val_source)):
        label = val_source[i]["label"]
        counts += metrics.counts_numpy(np.full_like(label, majority), label, n_cls, ignore_index)
    return metrics.scores_from_counts(counts)["mIoU"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(config, workdir) of one runlocal demo run through main.py."""
    tmp = tmp_path_factory.mktemp("demo")
    workdir, data_root = tmp / "run", tmp / "data" / "ADEChallengeData2016"
    args = [sys.executable, str(REPO / "main.py"), "--config=configs/demo.py:runlocal"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        args + demo_overrides(workdir, data_root), cwd=REPO, env=env, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return demo_config_for_test(data_root), workdir


def test_validation_split_uses_another_seed(demo_run):
    config, _ = demo_run
    common.validate(config)
    assert config.data.synthetic_val_seed != config.data.synthetic_seed
    manifest = json.loads((pathlib.Path(config.data.root) / "synthetic.json").read_text())
    assert (manifest["seed"], manifest["val_seed"]) == (config.data.synthetic_seed, VAL_SEED)


def test_demo_loss_falls(demo_run):
    config, workdir = demo_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, config.total_steps + 1))
    losses = np.array([r["loss"] for r in rows])
    assert np.all(np.isfinite(losses))
    first, last = losses[:20].mean(), losses[-20:].mean()
    assert last <= LOSS_RATIO * first, (first, last)


def test_demo_beats_untrained_and_majority_class(demo_run):
    config, workdir = demo_run
    results = json.loads(evaluation.results_path(workdir, config.total_steps).read_text())
    trained = results["mIoU"]
    val_source = source_from_config(config, "val")
    untrained = evaluation.run_evaluation(
        Segmentor.from_config(config), config, val_source, progress=False
    )["mIoU"]
    majority = majority_class_miou(
        source_from_config(config, "train"), val_source, config.model.n_cls,
        config.data.ignore_index,
    )  # fmt: skip
    report = dict(trained=trained, untrained=untrained, majority=majority)
    assert trained >= UNTRAINED_FACTOR * untrained, report
    assert trained >= majority + MAJORITY_MARGIN, report
