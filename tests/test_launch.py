"""Launching main.py as a multi-process job (rankseg_jax/distributed.py, the launch flags).

The end-to-end test runs what docs/scaling.md gives for "two processes on one machine":
two `main.py` processes on 127.0.0.1 with 2 simulated CPU devices each, against one process
with 4 devices and the same global batch.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from conftest import REPO

from rankseg_jax import distributed

TIMEOUT_S = 600
# The demo shrunk to a 1-layer ViT at 32 px, 3 steps of SGD (Adam's first steps divide tiny
# gradients by their own size, which turns float reduction-order noise into lr-sized changes),
# an evaluation of 3 val images at the last step.
TINY = (
    "--config.total_steps=3", "--config.batch_size=4", "--config.model.width=32",
    "--config.model.depth=1", "--config.model.num_heads=1", "--config.model.mlp_dim=64",
    "--config.model.dec_heads=1", "--config.model.dec_layers=2", "--config.model.k=8",
    "--config.model.img_size=(32,32)", "--config.data.crop_size=(32,32)",
    "--config.data.img_scale=(128,32)", "--config.data.test_scale=(128,32)",
    "--config.data.num_workers=0", "--config.data.generate_if_missing=False",
    "--config.eval.crop=(32,32)", "--config.eval.stride=(32,32)", "--config.eval.max_images=3",
    "--config.eval.tile=(64,128)", "--config.checkpoint.async_save=False",
    "--config.logging.every_steps=1", "--config.optimizer.name=sgd",
    "--config.optimizer.lr=0.01", "--config.optimizer.momentum=0.9",
    "--config.schedule.warmup_steps=0",
)  # fmt: skip
# The last logged loss of 2 processes x 2 devices vs 1 process x 4 devices: the same mesh
# shape (4 data shards), the same global batch rows in the same order; only the all-reduce
# differs (gloo across processes vs in-process), so float32 summation order is the only source
# of difference: a few ulps of the loss after 2 updates. 1e-5 relative is far above that and
# far below what one different row or one missed update changes (> 1e-2 here).
LOSS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main_command(root: pathlib.Path, workdir: pathlib.Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "main.py"), "--config=configs/demo.py:runlocal",
        f"--workdir={workdir}", f"--config.data.root={root}", *TINY, *extra,
    ]  # fmt: skip


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return dict(
        env, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
    )


def _files(workdir: pathlib.Path) -> list[str]:
    """Paths written outside the checkpoints (orbax writes each process's own shard there)."""
    return sorted(
        "events.out.tfevents"
        if p.name.startswith("events.out.tfevents")
        else str(p.relative_to(workdir))
        for p in workdir.rglob("*")
        if p.is_file() and "checkpoints" not in p.relative_to(workdir).parts
    )


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_two_main_processes_match_one(synthetic_ade, tmp_path):
    """`main.py --coordinator_address=127.0.0.1:P --num_processes=2 --process_id=I` x 2
    (2 CPU devices each, gloo) vs `main.py` with 4 devices: same last loss, same evaluation
    counts, and the files of one run (process 1 writes none but its checkpoint shard)."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
    runs = [(_main_command(synthetic_ade, one), _env(4))] + [
        (_main_command(synthetic_ade, two, *launch, f"--process_id={i}"), _env(2)) for i in range(2)
    ]
    procs = [
        subprocess.Popen(
            c, cwd=REPO, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for c, e in runs
    ]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:  # a failed or hung process must not leave its peer waiting
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]
    assert "single process (no cluster detected)" in logs[0]
    for i in range(2):
        assert (
            f"jax.distributed initialised (launch settings given): process {i} of 2" in logs[i + 1]
        )
    # Training: the same global batch over 4 devices gives the same loss at every step.
    losses_one, losses_two = _losses(one), _losses(two)
    assert [s for s, _ in losses_two] == [1, 2, 3]  # one line per step: process 0 only
    assert [s for s, _ in losses_one] == [1, 2, 3]
    assert losses_two[-1][1] == pytest.approx(losses_one[-1][1], rel=LOSS_RTOL)
    assert abs(losses_one[-1][1] - losses_one[0][1]) > 100 * LOSS_RTOL  # the steps moved it
    # Evaluation at the last step: each process scores its share; the summed counts are exact.
    res_one = json.loads((one / "eval" / "results_step3.json").read_text())
    res_two = json.loads((two / "eval" / "results_step3.json").read_text())
    assert res_two["num_images"] == res_one["num_images"] == 3
    assert res_two["counts"] == res_one["counts"]
    assert sum(res_one["counts"]["label"]) > 0
    # Files: exactly one run's worth (one TensorBoard file, one provenance start), so process 1
    # wrote none of them; both runs print the final mIoU, only process 0 prints the table.
    assert _files(two) == _files(one)
    assert len(json.loads((two / "provenance.json").read_text())) == 1
    assert "final mIoU" in logs[1] and "final mIoU" in logs[2]
    assert "eval results written" in logs[1] and "eval results written" not in logs[2]


# ------------------------------------------------------------------ in-process units


def test_flags_win_over_environment_and_are_checked():
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    assert distributed.resolve_launch(env=env) == distributed.Launch("10.0.0.1:1234", 4, 3)
    launch = distributed.resolve_launch("host-0:99", 2, 1, env=env)
    assert launch.kwargs() == dict(coordinator_address="host-0:99", num_processes=2, process_id=1)
    assert distributed.resolve_launch(env={}) == distributed.Launch()
    assert not distributed.Launch().explicit
    bad = [
        (dict(num_processes=2), {}, "needs --coordinator_address"),
        (dict(coordinator_address="10.0.0.1"), {}, "expected HOST:PORT"),
        (dict(coordinator_address="h:70000"), {}, "expected HOST:PORT"),
        (dict(num_processes=2, process_id=2, coordinator_address="h:1"), {}, "ids are 0 … 1"),
        (dict(num_processes=0), {}, "--num_processes=0: must be ≥ 1"),
        ({}, {"JAX_PROCESS_ID": "abc"}, "JAX_PROCESS_ID='abc': expected an integer"),
        ({}, {"JAX_NUM_PROCESSES": "-1"}, "JAX_NUM_PROCESSES=-1"),
    ]
    for kwargs, env, message in bad:
        with pytest.raises(distributed.DistributedConfigError, match=message):
            distributed.resolve_launch(**kwargs, env=env)
    # A SLURM job supplies the address itself: the process count alone is then fine.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}
    assert distributed.resolve_launch(num_processes=2, env=slurm).num_processes == 2


def test_maybe_initialize_without_a_cluster_does_not_join():
    assert distributed.maybe_initialize("auto", env={}) == "single process (no cluster detected)"
    assert distributed.maybe_initialize("off", env={}) == "off"
    assert "num_processes=1" in distributed.maybe_initialize("on", num_processes=1, env={})
    with pytest.raises(distributed.DistributedConfigError, match="--distributed=off with"):
        distributed.maybe_initialize("off", "h:1", 2, 0, env={})
    assert issubclass(distributed.DistributedError, ValueError)


def test_bad_launch_flag_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rankseg_jax", "--config=configs/demo.py", f"--workdir={tmp_path}",
         "--num_processes=2", "--process_id=0", "--coordinator_address=127.0.0.1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=_env(1),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: coordinator address '127.0.0.1': expected HOST:PORT (e.g. 10.0.0.1:1234)"
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())
