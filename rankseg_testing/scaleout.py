"""Scale-out checks that need their own JAX process (tests/test_scaleout.py runs them).

    python -m rankseg_testing.scaleout meshes  --out DIR
    python -m rankseg_testing.scaleout restore --out DIR
    python -m rankseg_testing.scaleout worker  --out DIR --data-root ROOT \
        [--num-processes 2 --process-id I --port P] --local-devices N --fsdp F

`meshes` and `restore` need 8 CPU devices: run them with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX starts. `worker` sets its
device count itself and, with --num-processes > 1, joins a localhost jax.distributed cluster
(gloo CPU collectives). Each command writes JSON (and npz params) under --out for the test
to compare; nothing here asserts, so one failing check never hides the others.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

import numpy as np

MESHES = ((8, 1), (4, 2), (1, 8))
FSDP_MIN_SIZE_MB = 0.004  # ~4 KB: the tiny model's larger kernels get sharded
STEPS = 3


def tiny_config(data_root: str = "", batch_size: int = 8, fsdp: int = 1) -> Any:
    """A 1-layer ViT at 32 px with drop-path and dropout active (the tests' tiny model)."""
    from rankseg_jax.config import load_config

    config = load_config("configs/demo.py:runlocal")
    with config.unlocked():
        config.batch_size = batch_size
        config.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, dec_heads=1, k=8)
        config.model.update(img_size=(32, 32), dec_layers=2, drop_path_rate=0.2, dropout=0.1)
        config.data.update(root=data_root, crop_size=(32, 32), img_scale=(128, 32))
        config.data.update(test_scale=(96, 32), num_workers=0, generate_if_missing=False)
        config.eval.update(crop=(32, 32), stride=(24, 24), max_images=5, window_batch=2)
        config.eval.update(tile=(64, 128))
        config.mesh.update(data=-1, fsdp=fsdp, fsdp_min_size_mb=FSDP_MIN_SIZE_MB)
        config.schedule.warmup_steps = 0
        # The reference recipe's SGD: updates proportional to the gradients. (Adam's first
        # steps divide tiny gradients by their own size, which turns float reduction-order
        # noise into lr-sized differences between meshes.)
        config.optimizer.update(name="sgd", lr=0.01, momentum=0.9)
    return config


def random_batches(config: Any, steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    """Fixed random global batches: image float32 (B, 32, 32, 3), label int32 (B, 32, 32)."""
    rng = np.random.default_rng(0)
    b, (h, w) = config.batch_size, config.model.img_size
    out = []
    for _ in range(steps):
        label = rng.integers(0, config.model.n_cls, (b, h, w)).astype(np.int32)
        label[:, :4] = config.data.ignore_index
        out.append(dict(image=rng.normal(size=(b, h, w, 3)).astype(np.float32), label=label))
    return out


def host_params(params: Any) -> dict[str, np.ndarray]:
    """Flat {path: numpy} of (possibly sharded, multi-process) params."""
    import jax
    from jax.experimental import multihost_utils

    from rankseg_jax import sharding as shd

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {shd.path_name(p): np.asarray(x) for p, x in flat}


def relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """max|a − b| / max|a| over all leaves."""
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    scale = max(float(np.max(np.abs(a[k]))) for k in a)
    return diff / scale


def _train(config: Any, mesh: Any, batches: list[dict[str, np.ndarray]]) -> tuple[Any, list]:
    """3 steps on `mesh` from the seeded init; (state, compilations per step)."""
    import jax

    from rankseg_jax import inference, optim, train
    from rankseg_jax import sharding as shd
    from rankseg_jax.models.segmenter import create_model

    model, tx = create_model(config.model), optim.make_optimizer(config)
    state = train.create_state(config, model, tx, mesh)
    shardings = train.config_state_shardings(state, mesh, config)
    step_fn = train.compile_train_step(model, tx, config, shardings, shd.batch_sharding(mesh))
    compiles = []
    for batch in batches:
        batch = jax.device_put(batch, shd.batch_sharding(mesh))
        with inference.count_compilations() as names:
            state, _ = step_fn(state, batch)
            jax.block_until_ready(state)
        compiles.append(len(names))
    return state, compiles


def sharding_report(state: Any, mesh: Any, config: Any) -> dict[str, Any]:
    """Per param: expected FSDP spec vs the leaf's actual spec and shard shape; opt state too."""
    import jax

    from rankseg_jax import sharding as shd

    rows, mismatches = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        name = shd.path_name(path)
        expected = shd.param_spec(name, leaf, mesh, fsdp_min_size_mb=config.mesh.fsdp_min_size_mb)
        shard = leaf.addressable_shards[0].data.shape
        sharded = shard != leaf.shape
        rows.append(dict(name=name, spec=str(leaf.sharding.spec), sharded=sharded))
        if leaf.sharding.spec != expected or sharded != (expected != jax.P()):
            mismatches.append(f"{name}: {leaf.sharding.spec} vs {expected}, shard {shard}")
    leaves = jax.tree.leaves(state.params)
    big = [
        r["name"]
        for r, leaf in zip(rows, leaves, strict=True)
        if leaf.nbytes > config.mesh.fsdp_min_size_mb * 2**20
    ]
    opt_sharded = sum(
        x.addressable_shards[0].data.shape != x.shape for x in jax.tree.leaves(state.opt_state)
    )
    return dict(
        sharded=sum(r["sharded"] for r in rows),
        large=len(big),
        large_unsharded=[r["name"] for r in rows if r["name"] in big and not r["sharded"]],
        mismatches=mismatches,
        opt_state_sharded=int(opt_sharded),
    )


def run_meshes(out: pathlib.Path) -> dict[str, Any]:
    """One device vs the meshes (8,1), (4,2), (1,8): params after 3 steps, shardings, compiles."""
    import jax

    from rankseg_jax import sharding as shd

    config = tiny_config()
    batches = random_batches(config)
    one = shd.make_mesh(1, 1, jax.devices()[:1])
    initial = host_params(_init(config, one).params)
    single, compiles = _train(config, one, batches)
    reference = host_params(single.params)
    report: dict[str, Any] = {
        "devices": jax.device_count(),
        "single_compiles": compiles,
        "trained_change": relative_difference(initial, reference),
    }
    for data, fsdp in MESHES:
        with config.unlocked():
            config.mesh.update(data=data, fsdp=fsdp)
        mesh = shd.mesh_from_config(config)
        state, compiles = _train(config, mesh, batches)
        report[f"{data}x{fsdp}"] = dict(
            relative_difference=relative_difference(reference, host_params(state.params)),
            compiles=compiles,
            **sharding_report(state, mesh, config),
        )
    return report


def _init(config: Any, mesh: Any) -> Any:
    from rankseg_jax import optim, train
    from rankseg_jax.models.segmenter import create_model

    return train.create_state(
        config, create_model(config.model), optim.make_optimizer(config), mesh
    )


def run_restore(out: pathlib.Path) -> dict[str, Any]:
    """Save on (4, 2) with FSDP, restore through `train.initial_state` on 1 device and (8, 1)."""
    import jax

    from rankseg_jax import checkpoint, optim, train
    from rankseg_jax import sharding as shd
    from rankseg_jax.models.segmenter import create_model

    config = tiny_config(fsdp=2)
    with config.unlocked():
        config.mesh.data = 4
        config.checkpoint.async_save = False
    model, tx = create_model(config.model), optim.make_optimizer(config)
    mesh = shd.mesh_from_config(config)
    state, _ = _train(config, mesh, random_batches(config, 1))
    saved = host_params(state.params)
    saved_opt = [np.asarray(x) for x in jax.tree.leaves(state.opt_state)]
    workdir = out / "run"
    manager = checkpoint.make_manager(workdir, config)
    checkpoint.save(manager, 1, state.params, state.train_items(), {"step": 1})
    manager.wait_until_finished()
    report: dict[str, Any] = {
        "saved_sharded": sum(x.sharding.spec != jax.P() for x in jax.tree.leaves(state.params))
    }
    for name, (data, fsdp), devices in (("1", (1, 1), jax.devices()[:1]), ("8x1", (8, 1), None)):
        with config.unlocked():
            config.mesh.update(data=data, fsdp=fsdp)
        new_mesh = shd.make_mesh(data, fsdp, devices)
        restored, data_state, origin = train.initial_state(
            config, workdir, model, tx, new_mesh, manager
        )
        leaves = jax.tree.leaves(restored.params) + jax.tree.leaves(restored.opt_state)
        report[name] = dict(
            origin=origin,
            data_state=data_state,
            step=int(restored.step),
            equal=all(np.array_equal(saved[k], v) for k, v in host_params(restored.params).items())
            and all(
                np.array_equal(a, np.asarray(b))
                for a, b in zip(saved_opt, jax.tree.leaves(restored.opt_state), strict=True)
            ),
            devices=sorted({len(x.sharding.device_set) for x in leaves}),
            replicated=all(x.sharding.is_fully_replicated for x in leaves),
        )
    manager.close()
    return report


def run_worker(args: argparse.Namespace, out: pathlib.Path) -> dict[str, Any]:
    """One process of a (1- or N-process) run: evaluate the seeded init, then train 3 steps
    from this process's share of the data; process 0 saves the params."""
    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    from rankseg_jax import evaluation, inference, optim, train
    from rankseg_jax import sharding as shd
    from rankseg_jax.data.pipeline import PipelineConfig, TrainIterator
    from rankseg_jax.data.sources import source_from_config
    from rankseg_jax.models.segmenter import create_model
    from rankseg_jax.segmentor import Segmentor

    config = tiny_config(args.data_root, batch_size=4, fsdp=args.fsdp)
    mesh = shd.mesh_from_config(config)
    model, tx = create_model(config.model), optim.make_optimizer(config)
    state = train.create_state(config, model, tx, mesh)

    inferencer = Segmentor(config, model, shd.local_replica(state.params, mesh)).inferencer
    evaldir = out / f"eval_p{jax.process_index()}"
    results = evaluation.run_evaluation(
        inferencer, config, source_from_config(config, "val"), workdir=evaldir, progress=False
    )

    shardings = train.config_state_shardings(state, mesh, config)
    step_fn = train.compile_train_step(model, tx, config, shardings, shd.batch_sharding(mesh))
    source = source_from_config(config, "train")
    pipeline = TrainIterator(
        source, PipelineConfig.from_config(config), sharding=shd.batch_sharding(mesh)
    )
    compiles, positions = [], []
    with pipeline:
        for _ in range(STEPS):
            batch = next(pipeline)
            positions.append(pipeline.positions.tolist())
            with inference.count_compilations() as names:
                state, _ = step_fn(state, batch)
                jax.block_until_ready(state)
            compiles.append(len(names))
    params = host_params(state.params)
    if jax.process_index() == 0:
        np.savez(out / "params.npz", **params)
    return dict(
        process=jax.process_index(),
        processes=jax.process_count(),
        devices=jax.device_count(),
        mesh=dict(mesh.shape),
        counts=results["counts"],
        mIoU=results["mIoU"],
        local_windows=inferencer.windows_run,
        local_images=evaluation.local_image_count(len(source_from_config(config, "val")), 5),
        compiles=compiles,
        positions=positions,
        eval_files=sorted(p.name for p in evaldir.rglob("*") if p.is_file()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("meshes", "restore", "worker"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-root", default="")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--local-devices", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1)
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command != "worker":
        import jax

        jax.config.update("jax_disable_most_optimizations", True)  # compile fast; same math
    if args.command == "meshes":
        report = run_meshes(out)
    elif args.command == "restore":
        report = run_restore(out)
    else:
        report = run_worker(args, out)
    name = f"{args.command}_p{args.process_id}.json"
    (out / name).write_text(json.dumps(report, indent=1, default=str))
    print("DONE", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
