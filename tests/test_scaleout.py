"""Scale-out: meshes, FSDP, restore onto another mesh, two real processes (rankseg_jax/sharding.py,
rankseg_jax/train.py; the multi-device checks run `rankseg_testing.scaleout` in subprocesses
with 8 simulated CPU devices or a localhost jax.distributed cluster)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO

from rankseg_jax import optim, train
from rankseg_jax import sharding as shd
from rankseg_jax.errors import ConfigError
from rankseg_testing.scaleout import tiny_config

TOLERANCE = 1e-5  # max|Δθ| ≤ 1e-5 · max|θ| between meshes / process counts
TIMEOUT_S = 300


def _env(devices: int | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    if devices:  # must be set before JAX starts: hence a subprocess
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _command(name: str, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rankseg_testing.scaleout", name, f"--out={out}", *extra]


def _run(name: str, out, devices: int = 8) -> dict:
    proc = subprocess.run(
        _command(name, out), cwd=REPO, env=_env(devices), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / f"{name}_p0.json").read_text())


def test_meshes_give_one_device_params_and_shard_large_params(tmp_path):
    """(8,1), (4,2), (1,8) vs one device after 3 steps with drop-path 0.2 and dropout 0.1."""
    report = _run("meshes", tmp_path)
    assert report["devices"] == 8
    assert report["trained_change"] > 100 * TOLERANCE  # the steps really moved the params
    assert report["single_compiles"] == [1, 0, 0]
    for name in ("8x1", "4x2", "1x8"):
        mesh = report[name]
        assert mesh["relative_difference"] <= TOLERANCE, (name, mesh)
        assert mesh["compiles"] == [1, 0, 0], (name, mesh)  # no recompiles between steps
        assert mesh["mismatches"] == [], (name, mesh)
        assert mesh["large"] >= 10
    assert report["8x1"]["sharded"] == 0 and report["8x1"]["opt_state_sharded"] == 0
    for name in ("4x2", "1x8"):  # every param above the FSDP threshold is split over 'fsdp'
        assert report[name]["large_unsharded"] == [], report[name]
        assert report[name]["sharded"] == report[name]["large"]
        assert report[name]["opt_state_sharded"] == report[name]["large"]  # SGD momentum


def test_checkpoint_from_4x2_restores_onto_one_device_and_8x1(tmp_path):
    report = _run("restore", tmp_path)
    assert report["saved_sharded"] >= 10  # the checkpoint was written from FSDP shards
    for name, devices in (("1", [1]), ("8x1", [8])):
        restored = report[name]
        assert restored["origin"] == "checkpoint step 1" and restored["step"] == 1
        assert restored["equal"], restored  # params and optimizer state bit-exact
        assert restored["devices"] == devices and restored["replicated"]
        assert restored["data_state"] == {"step": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(synthetic_ade, tmp_path):
    """2 processes x 2 CPU devices (mesh 2x2, gloo) vs 1 process on 1 device: params after 3
    steps from each process's own data share; evaluation of 5 images (3 + 2, uneven windows)
    gives the same confusion counts exactly; only process 0 writes files."""
    single_out, multi_out = tmp_path / "single", tmp_path / "multi"
    root = f"--data-root={synthetic_ade}"
    port = _free_port()
    commands = [_command("worker", single_out, root)] + [
        _command(
            "worker",
            multi_out,
            root,
            "--num-processes=2",
            f"--process-id={i}",
            f"--port={port}",
            "--local-devices=2",
            "--fsdp=2",
        )  # fmt: skip
        for i in range(2)
    ]
    procs = [
        subprocess.Popen(
            c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for c in commands
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
    one = json.loads((single_out / "worker_p0.json").read_text())
    two = [json.loads((multi_out / f"worker_p{i}.json").read_text()) for i in range(2)]
    assert [r["processes"] for r in two] == [2, 2] and two[0]["devices"] == 4
    assert two[0]["mesh"] == {"data": 2, "fsdp": 2}
    # Own data shards: contiguous halves of each global batch, together the 1-process batch.
    assert [a + b for a, b in zip(two[0]["positions"], two[1]["positions"], strict=True)] == one[
        "positions"
    ]
    a, b = np.load(single_out / "params.npz"), np.load(multi_out / "params.npz")
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert diff <= TOLERANCE * max(float(np.max(np.abs(a[k]))) for k in a)
    assert all(r["compiles"] == [1, 0, 0] for r in (one, *two))
    # Evaluation: uneven shares, exact sums, files from process 0 only.
    assert [r["local_images"] for r in two] == [3, 2] and one["local_images"] == 5
    assert two[0]["local_windows"] != two[1]["local_windows"]
    assert two[0]["local_windows"] + two[1]["local_windows"] == one["local_windows"]
    assert two[0]["counts"] == two[1]["counts"] == one["counts"]
    assert sum(one["counts"]["label"]) > 0 and sum(one["counts"]["prediction"]) > 0
    assert two[0]["eval_files"] and not two[1]["eval_files"]


# ------------------------------------------------------------------ in-process units


def test_fsdp_rule_shards_largest_divisible_dim():
    mib = 2**20
    assert shd.fsdp_spec((1024, 4096), 16 * mib, 8, 4.0) == jax.P(None, "fsdp")
    assert shd.fsdp_spec((4096, 1024), 16 * mib, 8, 4.0) == jax.P("fsdp", None)
    assert shd.fsdp_spec((1001, 1026), 16 * mib, 8, 4.0) == jax.P()  # nothing divides
    assert shd.fsdp_spec((1032, 1028), 16 * mib, 8, 4.0) == jax.P("fsdp", None)  # next largest
    assert shd.fsdp_spec((1024, 4096), 4 * mib, 8, 4.0) == jax.P()  # not above the threshold
    assert shd.fsdp_spec((1024, 4096), 16 * mib, 1, 4.0) == jax.P()  # no fsdp axis


def test_rules_optimizer_state_and_table():
    """Regex rules (first match wins), momentum follows its param, counters replicated."""
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    params = {"enc": {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)}}
    rules = ((r"enc/bias", jax.P("fsdp")), (r".*", "fsdp"))
    specs = shd.param_shardings(params, mesh, rules=rules, fsdp_min_size_mb=0.0)
    assert specs["enc"]["bias"].spec == jax.P("fsdp")
    assert specs["enc"]["kernel"].spec == jax.P()  # fsdp axis of size 1: replicated
    opt_state = optax.sgd(0.1, momentum=0.9).init(params)
    followed = shd.follow_params(opt_state, params, specs, mesh)
    paths = {shd.path_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(followed)[0]}
    assert paths["0/trace/enc/bias"].spec == jax.P("fsdp")
    table = shd.sharding_table(params, specs)
    assert "enc/bias" in table and "(4,)" in table and "P('fsdp',)" in table
    with pytest.raises(ConfigError, match="unknown tactic"):
        shd.param_shardings(params, mesh, rules=((".*", "shard_everything"),))


def test_mesh_from_config_errors_name_both_numbers():
    config = tiny_config(batch_size=3)
    n = jax.device_count()
    with config.unlocked():
        config.batch_size = 2 * n + 1 if n > 1 else 0
    with pytest.raises(ConfigError, match=rf"batch_size={config.batch_size} .* {n} devices"):
        shd.mesh_from_config(config)
    with config.unlocked():
        config.batch_size, config.mesh.data = 2, n + 1
    with pytest.raises(ConfigError, match=rf"= {n + 1} devices, but there are {n} devices"):
        shd.mesh_from_config(config)


def test_gradient_accumulation_updates_every_k_steps():
    """optimizer.grad_accum_steps=2 (optax.MultiSteps): params move on steps 2 and 4 only."""
    from rankseg_jax.models.segmenter import create_model
    from rankseg_testing.scaleout import random_batches

    config = tiny_config(batch_size=2)
    with config.unlocked():
        config.optimizer.grad_accum_steps = 2
    mesh = shd.mesh_from_config(config)
    model, tx = create_model(config.model), optim.make_optimizer(config)
    state = train.create_state(config, model, tx, mesh)
    shardings = train.config_state_shardings(state, mesh, config)
    step_fn = train.compile_train_step(model, tx, config, shardings, shd.batch_sharding(mesh))
    moved = []
    for batch in random_batches(config, 4):
        before = jax.device_get(state.params)
        state, metrics = step_fn(state, jax.device_put(batch, shd.batch_sharding(mesh)))
        after = jax.device_get(state.params)
        change = max(
            float(np.max(np.abs(x - y)))
            for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        )
        moved.append(change > 0)
        assert np.isfinite(float(metrics["grad_norm"]))
    assert moved == [False, True, False, True]
    assert int(state.step) == 4
