"""Training: the step (a pure function of state and a global batch) and the loop around it.

`train_and_evaluate(config, workdir)` is what `main.py --mode=train` runs: it validates the
config and the dataset, writes provenance, restores the latest checkpoint of the workdir (or
starts from `init_from` / `model.pretrained` / scratch), then trains with periodic logging,
checkpoints, evaluation and a SIGTERM-safe exit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import periodic_actions
from jax.experimental import multihost_utils

from rankseg_jax import checkpoint, download, evaluation, losses, optim, provenance, weights
from rankseg_jax import config as config_lib
from rankseg_jax import sharding as shd
from rankseg_jax.convert import loading
from rankseg_jax.data import class_stats
from rankseg_jax.data.pipeline import PipelineConfig, TrainIterator
from rankseg_jax.data.sources import source_from_config
from rankseg_jax.download import DownloadError
from rankseg_jax.errors import DatasetError
from rankseg_jax.models.segmenter import create_model
from rankseg_jax.segmentor import Segmentor

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `finite` stays True until a non-finite loss or gradient;
    `first_bad_step` is then the step it happened (−1 before); such updates are not applied.
    `model_state`: the model's non-param collections (e.g. BatchNorm `batch_stats`), updated
    by every training forward; empty for Segmenter."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    finite: jax.Array
    first_bad_step: jax.Array
    model_state: PyTree = dataclasses.field(default_factory=dict)

    def train_items(self) -> dict:
        """What the checkpoint's `train` item holds (params and model_state are items of their
        own, so evaluation and export restore them without the optimizer state)."""
        return dict(
            step=self.step,
            opt_state=self.opt_state,
            rng=self.rng,
            finite=self.finite,
            first_bad_step=self.first_bad_step,
        )


def new_state(
    params: PyTree, tx: optax.GradientTransformation, seed: int, model_state: PyTree = None
) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.PRNGKey(seed)),
        finite=jnp.ones((), bool),
        first_bad_step=jnp.full((), -1, jnp.int32),
        model_state=dict(model_state or {}),
    )


def with_train_items(state: TrainState, params: PyTree, items: dict) -> TrainState:
    return state.replace(params=params, **items)


def _global_norm(tree: PyTree) -> jax.Array:
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _all_finite(*trees: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]
    return jnp.all(jnp.stack(leaves))


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    batch_sharding: jax.sharding.NamedSharding | None = None,
    class_weight: tuple[float, ...] | None = None,
) -> tuple[TrainState, dict]:
    """One optimisation step on a global batch: images (B, H, W, 3), labels (B, H, W).

    Dropout and drop-path draw from `fold_in(rng, step)`, so a resumed run repeats them.
    A non-finite loss or gradient leaves params and optimizer state unchanged and clears
    `finite`; the loop reads that flag at log and save steps. `batch_sharding` (the batch
    axes) constrains images and labels, hence the activations, inside the step.
    With `optimizer.grad_accum_steps` = k (optax.MultiSteps) params change every k-th step.
    `class_weight`: the resolved `loss.class_weight` (n_cls floats, `resolve_class_weight`),
    a constant of the compiled step.
    """
    images, labels = batch["image"], batch["label"]
    if batch_sharding is not None:  # activations follow the batch axes through the model
        images = jax.lax.with_sharding_constraint(images, batch_sharding)
        labels = jax.lax.with_sharding_constraint(labels, batch_sharding)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    gt = labels if config.model.classifier == "gt" else None

    mutable = list(state.model_state)

    def loss_fn(params):
        variables = {"params": params, **state.model_state}
        out = model.apply(
            variables,
            images,
            train=True,
            gt_labels=gt,
            rngs={"dropout": rng},
            mutable=mutable or False,
        )
        out, model_state = out if mutable else (out, state.model_state)
        total, metrics = losses.segmentation_losses(
            out, labels, config.loss, config.model.n_cls, config.data.ignore_index,
            class_weight=None if class_weight is None else jnp.asarray(class_weight, jnp.float32),
        )  # fmt: skip
        return total, (metrics, model_state)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = _all_finite(loss, grads)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    first_bad = jnp.where(state.finite & ~ok, state.step, state.first_bad_step)
    new = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        model_state=keep(dict(model_state), state.model_state),
        finite=state.finite & ok,
        first_bad_step=first_bad,
    )
    metrics = dict(
        metrics,
        grad_norm=_global_norm(grads),
        param_norm=_global_norm(state.params),
        update_norm=_global_norm(updates),
    )
    return new, metrics


def compile_train_step(model, tx, config, state_sharding, batch_sharding, class_weight=None):
    """`train_step` jitted with explicit shardings and the state donated."""
    step = functools.partial(
        train_step, model=model, tx=tx, config=config, batch_sharding=batch_sharding,
        class_weight=class_weight,
    )  # fmt: skip
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )


@dataclasses.dataclass
class MetricAccumulator:
    """Sums step metrics on device; `mean()` is the only host sync (at log steps)."""

    sums: dict | None = None
    count: int = 0

    def add(self, metrics: dict) -> None:
        self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
        self.count += 1

    def mean(self) -> dict[str, float]:
        host = jax.device_get(self.sums)
        out = {k: float(np.mean(v)) / self.count for k, v in host.items() if np.ndim(v) == 0}
        self.sums, self.count = None, 0
        return out


class SigtermFlag:
    """Set by SIGTERM (one process: our handler; with jax.distributed, orbax's sync point)."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def __enter__(self) -> SigtermFlag:
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def stop_requested(self, manager, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(manager.reached_preemption(step))
        return self.received


def replicated(mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def state_shardings(
    abstract_state: TrainState,
    mesh,
    *,
    fsdp_min_size_mb: float = 4.0,
    rules=shd.PARAM_RULES,
) -> TrainState:
    """Sharding of every state leaf: params by `sharding.param_shardings` (regex rules, FSDP of
    tensors above `fsdp_min_size_mb` over 'fsdp'), optimizer state following its params,
    step / rng / flags replicated. With mesh.fsdp = 1 everything is replicated."""
    params = shd.param_shardings(
        abstract_state.params, mesh, rules=rules, fsdp_min_size_mb=fsdp_min_size_mb
    )
    opt_state = shd.follow_params(abstract_state.opt_state, abstract_state.params, params, mesh)
    rest = jax.tree.map(lambda _: replicated(mesh), abstract_state)
    return rest.replace(params=params, opt_state=opt_state)


def config_state_shardings(abstract_state: TrainState, mesh, config) -> TrainState:
    """`state_shardings` with the config's `mesh.fsdp_min_size_mb`."""
    return state_shardings(
        abstract_state, mesh, fsdp_min_size_mb=float(config.mesh.fsdp_min_size_mb)
    )


def create_state(config, model, tx, mesh, compiler_options: dict | None = None) -> TrainState:
    """A fresh state (seeded init) created directly sharded: eval_shape -> shardings ->
    jit(init, out_shardings); no leaf is ever materialised whole on one device.
    `compiler_options`: XLA options of that compile (tests: a faster CPU compile)."""
    make, abstract = _abstract_state(model, tx, config, tuple(config.model.img_size))
    shardings = config_state_shardings(abstract, mesh, config)
    return jax.jit(make, out_shardings=shardings, compiler_options=compiler_options)()


# ------------------------------------------------------------------------------ the loop


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient; the message names the step."""


def _abstract_state(model, tx, config, image_shape):
    def make():
        images = jnp.zeros((1, *image_shape, 3), jnp.float32)
        labels = jnp.zeros((1, *image_shape), jnp.int32)
        variables = model.init(jax.random.PRNGKey(config.seed), images, gt_labels=labels)
        params = variables.pop("params")
        return new_state(params, tx, config.seed, model_state=variables)

    return make, jax.eval_shape(make)


def _with_shardings(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


NO_WEIGHTS = ("", "none")  # `model.pretrained` / `init_from` values meaning "random init"


@dataclasses.dataclass(frozen=True)
class InitWeights:
    """The weights a fresh run starts from, resolved to a local file before anything compiles.

    `key`: the config key that named them (`init_from` or `model.pretrained`); `spec`: its value
    (registry name, URL or path); `path`: the local file (or orbax workdir); `sha256`: the
    file's digest (None for a workdir).
    """

    key: str
    spec: str
    path: pathlib.Path
    sha256: str | None

    def describe(self) -> str:
        """One line for the log and provenance.json: what was loaded, from where, its digest."""
        kind = "init_from" if self.key == "init_from" else "model.pretrained (backbone)"
        digest = f"sha256 {self.sha256}" if self.sha256 else "an orbax workdir"
        return f"{kind} {self.spec} ({self.path}, {digest})"


def resolve_init_weights(config: ml_collections.ConfigDict) -> InitWeights | None:
    """`init_from`, else `model.pretrained` → a local file (downloaded into the cache if needed).

    None when both are empty or "none" (random init). Called before the model is built, so a
    paper row whose weights cannot be had stops at once with one line (a DownloadError, i.e. a
    UserError) naming the file and how to get it, instead of silently training from scratch.
    """
    for key, value in (
        ("init_from", config.init_from),
        ("model.pretrained", config.model.pretrained),
    ):
        spec = str(value or "").strip()
        if spec.lower() in NO_WEIGHTS:
            continue
        try:
            path = weights.resolve(spec)
        except DownloadError as err:
            hint = (
                ""
                if key == "init_from"
                else "; to train from random init instead, set --config.model.pretrained=none"
            )
            raise type(err)(f"{key}={spec}: {err}{hint}") from None
        digest = None if path.is_dir() else download.sha256_of(path)
        return InitWeights(key, spec, path, digest)
    return None


def initial_state(
    config,
    workdir,
    model,
    tx,
    mesh,
    manager,
    init: InitWeights | None = None,
    compiler_options: dict | None = None,
):
    """(state, data_state, origin): the workdir's latest checkpoint wins over init_from and
    model.pretrained (`init`, resolved beforehand by `resolve_init_weights`); state leaves are
    created directly with their shardings. `compiler_options`: XLA options of the state's
    compiles (tests: a faster CPU compile)."""

    make, abstract = _abstract_state(model, tx, config, tuple(config.model.img_size))
    shardings = config_state_shardings(abstract, mesh, config)
    if config.mesh.print_sharding and jax.process_index() == 0:
        logging.info("state sharding:\n%s", shd.sharding_table(abstract, shardings))
    step = manager.latest_step()
    if step is not None:
        target = _with_shardings(abstract, shardings)
        params, train, data_state, model_state = checkpoint.restore(
            manager, step, target.params, target.train_items(), target.model_state
        )
        state = with_train_items(target, params, train).replace(model_state=dict(model_state))
        return state, data_state, f"checkpoint step {step}"
    state = jax.jit(make, out_shardings=shardings, compiler_options=compiler_options)()
    if init is None:
        return state, None, f"random init (seed {config.seed})"
    base = {"params": state.params, **state.model_state}
    variables = loading.load_variables(init.path, model, config, base_variables=base)
    params = jax.device_put(variables.pop("params"), shardings.params)
    model_state = jax.device_put(variables, shardings.model_state)  # BN stats, if any
    state = jax.jit(
        functools.partial(new_state, tx=tx, seed=config.seed),
        out_shardings=shardings,
        compiler_options=compiler_options,
    )(params, model_state=model_state)
    return state, None, init.describe()


def _hparams(config: ml_collections.ConfigDict) -> dict:
    flat = flax.traverse_util.flatten_dict(config.to_dict(), sep=".")
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


def _peak_memory() -> dict:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {} if peak is None else {"peak_memory_gb": peak / 2**30}


@dataclasses.dataclass
class LoopTimer:
    """Wall time and time spent waiting for the input pipeline since the last log step."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    data: float = 0.0
    steps: int = 0

    def report(self, batch_size: int) -> dict:
        wall = time.perf_counter() - self.start
        out = dict(
            step_time_s=wall / max(self.steps, 1),
            images_per_s=batch_size * self.steps / max(wall, 1e-9),
            data_wait_share=self.data / max(wall, 1e-9),
        )
        self.start, self.data, self.steps = time.perf_counter(), 0.0, 0
        return out


def _check_finite(state: TrainState, step: int) -> None:
    finite, bad = jax.device_get((state.finite, state.first_bad_step))
    if not finite:
        raise NonFiniteError(
            f"non-finite loss or gradient at step {int(bad)} (seen by step {step}); "
            "the state is not saved; lower the learning rate or check the data"
        )


def _log_step(writer, step, acc, timer, config, schedule, pipeline, workdir) -> None:
    """Scalars to TensorBoard/console and one JSON line per log step to metrics.jsonl."""
    scalars = acc.mean()
    # The schedule counts iterations (micro-batches with grad accumulation; optim.py).
    scalars.update(timer.report(config.batch_size), learning_rate=float(schedule(step - 1)))
    scalars.update(_peak_memory(), skipped_records=pipeline.num_skipped)
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
        with open(workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(step=step, **scalars)) + "\n")


def _maybe_evaluate(config, evaluator, state, step, writer, workdir, val_source):
    """Periodic evaluation on the val split (all processes; process 0 writes the files)."""
    if val_source is None:
        return None

    variables = {"params": state.params, **state.model_state}  # BN: running statistics
    if jax.process_count() > 1:  # each process scores its own images on a local copy
        variables = shd.local_replica(variables, shd.mesh_of(state.params))
    return evaluation.run_evaluation(
        evaluator, config, val_source, params=variables, step=step, writer=writer,
        workdir=workdir, progress=False,
    )  # fmt: skip


def _should(every: int, step: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (resuming from the workdir), evaluate periodically; returns the last eval."""

    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    provenance.check_resume(config, workdir)
    source, val_source = _checked_sources(config)  # every dataset problem, before the model
    resuming = checkpoint.latest_step(workdir) is not None  # then no starting weights are read
    init = None if resuming else resolve_init_weights(config)
    mesh = shd.mesh_from_config(config)
    model, tx = create_model(config.model), optim.make_optimizer(config)
    manager = checkpoint.make_manager(workdir, config)
    state, data_state, origin = initial_state(config, workdir, model, tx, mesh, manager, init)
    logging.info("weights: %s", origin)
    provenance.record(config, workdir, origin, sha256=init.sha256 if init else None)
    writer = evaluation.create_writer(workdir)
    start = int(jax.device_get(state.step))
    writer.write_texts(start, {"weights": origin})
    if start == 0:
        writer.write_hparams(_hparams(config))
    class_weight = resolve_class_weight(config, source, writer)  # before compiling
    step_fn = compile_train_step(
        model, tx, config, config_state_shardings(state, mesh, config), shd.batch_sharding(mesh),
        class_weight,
    )  # fmt: skip
    pipeline = TrainIterator(
        source, PipelineConfig.from_config(config), sharding=shd.batch_sharding(mesh)
    )
    if data_state is not None:
        pipeline.set_state(data_state)
    eval_params, eval_state = state.params, state.model_state
    if jax.process_count() > 1:
        eval_params, eval_state = shd.local_replica((eval_params, eval_state), mesh)
    evaluator = Segmentor(config, model, eval_params, eval_state).inferencer  # compiled once
    schedule = optim.make_schedule(config)
    progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    results, acc, timer = None, MetricAccumulator(), LoopTimer()
    budget = TrainBudget(float(config.schedule.max_train_seconds))
    with pipeline, SigtermFlag() as sigterm:
        for step in range(start + 1, config.total_steps + 1):
            t0 = time.perf_counter()
            batch = next(pipeline)
            timer.data += time.perf_counter() - t0
            state, metrics = step_fn(state, batch)
            acc.add(metrics)
            timer.steps += 1
            progress(step)
            _profile(config, step, workdir)
            last = step if budget.spent() else config.total_steps  # the budget ends it here
            if _should(config.logging.every_steps, step, last):
                _check_finite(state, step)
                _log_step(writer, step, acc, timer, config, schedule, pipeline, workdir)
            evaluated = None
            if _should(config.eval.every_steps, step, last):
                evaluated = _maybe_evaluate(
                    config, evaluator, state, step, writer, workdir, val_source
                )
                results = evaluated or results
            stop = sigterm.stop_requested(manager, step)
            if stop or _should(config.checkpoint.every_steps, step, last):
                _check_finite(state, step)
                metrics = {"mIoU": evaluated["mIoU"]} if evaluated else None
                checkpoint.save(
                    manager, step, state.params, state.train_items(), pipeline.get_state(),
                    metrics, model_state=state.model_state,
                )  # fmt: skip
            if stop:
                manager.wait_until_finished()
                writer.write_texts(step, {"stopped": f"SIGTERM at step {step}, checkpoint saved"})
                break
            if step == last:
                budget.report(writer, step, start, config.total_steps)
                break
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    return results


def resolve_class_weight(
    config: ml_collections.ConfigDict, source: Any, writer: Any = None
) -> tuple[float, ...] | None:
    """`loss.class_weight` as n_cls floats (None when unweighted), before anything compiles.

    'inverse_frequency' reads every training label once (a progress bar) and caches the pixel
    counts beside the dataset keyed by the labels' content (rankseg_jax.data.class_stats), so
    later runs only hash the label files. Process 0 computes; the weights are broadcast.
    """
    setting = config_lib.class_weight_setting(config)
    if setting is None:
        return None
    if setting == config_lib.INVERSE_FREQUENCY:
        values = np.zeros(int(config.model.n_cls), np.float64)
        if jax.process_index() == 0:
            stats = class_stats.inverse_frequency_weights(source)
            values = stats.weights
            how = "read from" if stats.from_cache else "computed and cached in"
            logging.info("inverse-frequency class weights %s %s", how, stats.cache_path)
        if jax.process_count() > 1:
            values = np.asarray(multihost_utils.broadcast_one_to_all(values.astype(np.float32)))
        weights = tuple(float(w) for w in values)
    else:
        weights = tuple(setting)
    if writer is not None:
        names = getattr(source, "class_names", None) or [str(c) for c in range(len(weights))]
        table = ", ".join(f"{n}: {w:.3g}" for n, w in zip(names, weights, strict=True))
        writer.write_texts(0, {"loss/class_weight": table})
    return weights


def _checked_sources(config: ml_collections.ConfigDict):
    """(train source, val source or None), every dataset problem found before the model is built.

    The train split's layout (pairing) and its size: fewer examples than one global batch is a
    DatasetError naming the split and `batch_size`. With periodic evaluation
    (`eval.every_steps` > 0) the val split gets the same layout checks and any problem stops
    the run; with `eval.every_steps` = 0 a dataset without a usable val split trains, and the
    run says once, here, that no evaluation will run.
    """
    source = source_from_config(config, "train")
    where = getattr(source, "image_dir", None) or f"{config.data.dataset} {config.data.train_split}"
    if len(source) < config.batch_size:
        raise DatasetError(
            f"{where}: the train split has {len(source)} examples, fewer than one global batch "
            f"of {config.batch_size}; lower the config key batch_size (or add examples)"
        )
    if config.eval.every_steps > 0:
        return source, source_from_config(config, "val")
    try:
        return source, source_from_config(config, "val")
    except DatasetError as exc:
        logging.warning("no evaluation will run (eval.every_steps=0 and no val split): %s", exc)
        return source, None


class TrainBudget:
    """The wall-clock training budget `schedule.max_train_seconds` (0 = off).

    The clock starts when the loop does (the first step's compilation included). `spent()` is
    asked after each step; with several processes process 0's answer is broadcast, so every
    process ends at the same step. The step where it ends is then treated as the last one:
    logged, evaluated and checkpointed, so a resumed run continues from exactly there.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self.ended = False

    def spent(self) -> bool:
        if self.seconds <= 0:
            return False
        over = time.perf_counter() - self.start >= self.seconds
        if jax.process_count() > 1:  # one decision for all processes
            over = bool(multihost_utils.broadcast_one_to_all(np.asarray(over)))
        self.ended = over
        return over

    def report(self, writer, step: int, start: int, total_steps: int) -> None:
        """Log (and write to TensorBoard) what ended the training and the steps done."""
        elapsed = time.perf_counter() - self.start
        if self.ended:
            why = f"the time budget schedule.max_train_seconds={self.seconds:g}"
        else:
            why = f"the step count total_steps={total_steps}"
        text = (
            f"training ended by {why} at step {step} of {total_steps} "
            f"({step - start} steps in this run, {elapsed:.0f} s)"
        )
        logging.info(text)
        writer.write_texts(step, {"ended": text})


def _profile(config: ml_collections.ConfigDict, step: int, workdir) -> None:
    """Trace the steps after `logging.profile_steps[0]` up to `[1]` into <workdir>/profile."""
    steps = tuple(config.logging.profile_steps)
    if len(steps) != 2:
        return
    if step == steps[0]:
        jax.profiler.start_trace(str(workdir / "profile"))
    elif step == steps[1]:
        jax.profiler.stop_trace()
