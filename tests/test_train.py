"""The training loop: compiles once, resumes exactly, stops on NaN, guards its workdir."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO, tiny_train_config

from rankseg_jax import checkpoint, inference
from rankseg_jax import train as train_lib
from rankseg_jax.convert.loading import expected_params
from rankseg_jax.errors import ConfigError
from rankseg_jax.models.segmenter import create_model


def saved_config(workdir):
    """The resolved config a run wrote into its workdir."""
    return ml_collections.ConfigDict(
        json.loads((pathlib.Path(workdir) / "config.json").read_text())
    )


def final_params(config, workdir):
    model = create_model(config.model)
    return checkpoint.restore_params(workdir, expected_params(model, config))


def record_device_reads(monkeypatch, steps_done) -> list[int]:
    """Every read of a device array's value on this thread (`float(x)`, `np.asarray(x)`,
    `jax.device_get`: all go through `ArrayImpl._value`), as the number of steps done then.
    (The transfer guard cannot be used: it does not apply to the CPU backend.)"""
    from jax._src.array import ArrayImpl

    reads, original, thread = [], ArrayImpl._value, threading.get_ident()

    def value(self):
        if threading.get_ident() == thread:
            reads.append(steps_done())
        return original.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(value))
    return reads


def test_train_step_compiles_once(synthetic_ade, tmp_path, monkeypatch):
    """20 steps with log, eval and checkpoint steps: the step compiles exactly once, and the
    loop reads nothing back from the devices implicitly (a `float(x)` or `np.asarray(x)` on a
    device value would be a hidden host sync): values are read back only at the log, eval and
    checkpoint steps."""
    config = tiny_train_config(synthetic_ade, steps=20)
    with config.unlocked():
        config.logging.every_steps = 5
        config.eval.every_steps = 10
        config.checkpoint.every_steps = 10
    compiles, calls = [], []
    original = train_lib.compile_train_step

    def counting(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def wrapped(state, batch):
            with inference.count_compilations() as names:
                out = step_fn(state, batch)
            compiles.extend(names)
            calls.append(1)
            return out

        return wrapped

    monkeypatch.setattr(train_lib, "compile_train_step", counting)
    reads = record_device_reads(monkeypatch, lambda: len(calls))
    results = train_lib.train_and_evaluate(config, str(tmp_path))
    assert len(calls) == 20
    assert len(compiles) == 1, compiles
    assert reads and set(reads) <= {0, 5, 10, 15, 20}, sorted(set(reads))  # 0: restore/setup
    assert checkpoint.latest_step(tmp_path) == 20
    assert 0.0 <= results["mIoU"] <= 1.0


def test_non_finite_stops_and_names_the_step(synthetic_ade, tmp_path):
    config = tiny_train_config(synthetic_ade, steps=6)
    with config.unlocked():
        config.optimizer.lr = 1e30
        config.schedule.warmup_steps = 0
        config.logging.every_steps = 3
        config.checkpoint.every_steps = 3
    with pytest.raises(train_lib.NonFiniteError, match=r"non-finite loss or gradient at step \d"):
        train_lib.train_and_evaluate(config, str(tmp_path))
    assert checkpoint.latest_step(tmp_path) is None  # a non-finite state is never saved


def test_resume_refuses_another_model(synthetic_ade, tmp_path):
    config = tiny_train_config(synthetic_ade, steps=2)
    train_lib.train_and_evaluate(config, str(tmp_path))
    with config.unlocked():
        config.model.width = 48
    with pytest.raises(ConfigError, match=r"model.width: 32 → 48"):
        train_lib.train_and_evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / "provenance.json").read_text())
    assert saved[0]["weights"].startswith("random init") and saved[0]["git"]


# Long enough that the kill lands mid-run: the kill follows the step-3 checkpoint and 9 more
# synchronous checkpoints (every 3 steps) remain before the end. (100 steps tested the same
# resume at twice the cost.)
STEPS = 30


def run_main(workdir, data_root, steps, *extra, wait=True, cache_env=None):
    """main.py on the tiny model; cache_env: the shared compilation cache (compile_cache_env)."""
    args = [
        sys.executable, str(REPO / "main.py"), "--config=configs/demo.py:runlocal",
        f"--workdir={workdir}", "--mode=train", f"--config.total_steps={steps}",
        f"--config.data.root={data_root}", "--config.data.generate_if_missing=False",
        "--config.data.num_workers=1", "--config.data.prefetch=2", "--config.batch_size=2",
        "--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=1",
        "--config.model.dec_heads=1", "--config.model.mlp_dim=64", "--config.model.k=8",
        "--config.model.img_size=(32, 32)", "--config.data.crop_size=(32, 32)",
        "--config.data.img_scale=(128, 32)", "--config.data.test_scale=(128, 32)",
        "--config.eval.crop=(32, 32)", "--config.eval.stride=(32, 32)",
        "--config.eval.every_steps=0", "--config.eval.max_images=1",
        "--config.checkpoint.every_steps=3", "--config.checkpoint.async_save=False",
        "--config.logging.every_steps=3", "--config.model.drop_path_rate=0.1",
        "--config.model.dropout=0.1", *extra,
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(cache_env or {}))
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: SIGKILL reaches the data workers too
    )  # fmt: skip
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out.decode()[-3000:]
    return out.decode()


def kill_after_checkpoint(proc, workdir, step, sig):
    deadline = time.time() + 300
    done = pathlib.Path(workdir) / "checkpoints" / str(step)  # orbax renames it when complete
    while not done.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    if sig == signal.SIGKILL:  # a machine failure: the run and its data workers die at once
        os.killpg(proc.pid, signal.SIGKILL)
    else:  # a scheduler's polite stop, sent to the training process
        proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc.returncode


@pytest.fixture(scope="module")
def straight_run(synthetic_ade, tmp_path_factory, compile_cache_env):
    workdir = tmp_path_factory.mktemp("straight")
    run_main(workdir, synthetic_ade, STEPS, cache_env=compile_cache_env)
    return workdir


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_exactly(synthetic_ade, straight_run, tmp_path, sig, compile_cache_env):
    """STEPS steps straight == killed after a checkpoint and restarted (dropout, drop-path,
    1 data worker with prefetch): identical final params on CPU."""
    proc = run_main(tmp_path, synthetic_ade, STEPS, wait=False, cache_env=compile_cache_env)
    code = kill_after_checkpoint(proc, tmp_path, 3, sig)
    if sig == signal.SIGTERM:
        assert code == 0  # saved and exited cleanly
    assert checkpoint.latest_step(tmp_path) < STEPS
    out = run_main(tmp_path, synthetic_ade, STEPS, cache_env=compile_cache_env)
    assert "final mIoU" in out
    config = saved_config(straight_run)
    a, b = final_params(config, straight_run), final_params(config, tmp_path)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_missing_dataset_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--config=configs/ade20k_segmenter.py",
         f"--workdir={tmp_path}", f"--config.data.root={tmp_path / 'nowhere'}",
         "--config.model.pretrained=none"],  # the paper row's AugReg file is not the point here
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "nowhere" in last and "data.root" in last
    assert "Traceback" not in proc.stderr


def test_distributed_detection():
    from rankseg_jax.distributed import detect_cluster

    assert detect_cluster({}) is None
    assert detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert "SLURM" in detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"})
    assert "OpenMPI" in detect_cluster({"OMPI_COMM_WORLD_SIZE": "2"})
    assert detect_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) and not detect_cluster(
        {"TPU_WORKER_HOSTNAMES": "localhost"}
    )


def test_workdir_checkpoint_wins_over_init_from(synthetic_ade, straight_run, tmp_path):
    """A restart with init_from set still resumes from the workdir's checkpoint."""
    config = saved_config(straight_run)
    with config.unlocked():
        config.init_from = str(pathlib.Path(straight_run))
        config.data.num_workers = 0
        config.checkpoint.every_steps = 0  # the last step's checkpoint is the one that matters
        config.logging.every_steps = 0
    train_lib.train_and_evaluate(config, str(tmp_path))  # starts from init_from (orbax dir)
    starts = json.loads((tmp_path / "provenance.json").read_text())
    assert starts[-1]["weights"].startswith("init_from")
    with config.unlocked():
        config.total_steps = STEPS + 1
    train_lib.train_and_evaluate(config, str(tmp_path))
    starts = json.loads((tmp_path / "provenance.json").read_text())
    assert starts[-1]["weights"] == f"checkpoint step {STEPS}"
