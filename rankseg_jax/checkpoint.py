"""Orbax checkpoints of a training run: params, optimizer state, step, rng and data position.

Layout under `<workdir>/checkpoints/<step>/`: item `params` (the Flax params, so evaluation
and export restore them alone), item `train` (optimizer state, step, rng), item `data`
(the input pipeline's JSON state) and, for models with non-param collections (BatchNorm
`batch_stats` of the conv families), item `model_state` (evaluation and export need it too).
Orbax writes each step to a temporary folder and renames it when complete, so a killed run
never leaves a half-written step behind.

Kept: the latest `checkpoint.keep_latest` steps plus the `checkpoint.keep_best` best by mIoU.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from rankseg_jax.errors import CheckpointNotFoundError

BEST_METRIC = "mIoU"
ITEMS = ("params", "train", "data", "model_state")


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


def _best_metric(metrics: dict[str, Any]) -> float:
    return float(metrics[BEST_METRIC])


def _preservation(config: ml_collections.ConfigDict):
    keep = [policies.LatestN(n=max(config.checkpoint.keep_latest, 1))]
    if config.checkpoint.keep_best > 0:
        keep.append(
            policies.BestN(
                get_metric_fn=_best_metric,
                n=config.checkpoint.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    return policies.AnyPreservationPolicy(keep)


def make_manager(
    workdir: str | pathlib.Path, config: ml_collections.ConfigDict, read_only: bool = False
) -> ocp.CheckpointManager:
    """A CheckpointManager that saves when asked (the train loop decides when)."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_preservation(config),
        save_decision_policy=policies.FixedIntervalPolicy(1),
        enable_async_checkpointing=bool(config.checkpoint.async_save),
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS, options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    params: Any,
    train: Any,
    data_state: dict,
    metrics: dict | None = None,
    model_state: Any = None,
) -> None:
    """Save one step (asynchronously when configured); `metrics` feed the best-N policy.
    `model_state` (e.g. {'batch_stats': ...}) is its own item, written only when non-empty."""
    items = dict(
        params=ocp.args.StandardSave(params),
        train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(data_state),
    )
    if model_state:
        items["model_state"] = ocp.args.StandardSave(model_state)
    args = ocp.args.Composite(**items)
    manager.save(step, args=args, metrics=metrics, force=True)


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_params,
    abstract_train,
    abstract_model_state: Any = None,
):
    """(params, train, data_state, model_state) of `step`, placed like the abstract targets'
    shardings; model_state is {} unless `abstract_model_state` is non-empty."""
    items = dict(
        params=ocp.args.StandardRestore(abstract_params),
        train=ocp.args.StandardRestore(abstract_train),
        data=ocp.args.JsonRestore(),
    )
    if abstract_model_state:
        items["model_state"] = ocp.args.StandardRestore(abstract_model_state)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    model_state = restored.model_state if abstract_model_state else {}
    return restored.params, restored.train, restored.data, model_state


def latest_step(workdir: str | pathlib.Path) -> int | None:
    """The newest complete checkpoint step in `workdir`, or None."""
    if not checkpoint_dir(workdir).exists():
        return None
    return ocp.CheckpointManager(checkpoint_dir(workdir)).latest_step()


def restore_params(workdir: str | pathlib.Path, abstract_params, step: int | None = None):
    """Only the params of a checkpoint (latest by default), e.g. for evaluation or export.

    `abstract_params`: a pytree of jax.ShapeDtypeStruct (with shardings, or defaults).
    """
    return _restore_item(workdir, "params", abstract_params, step)


def restore_model_state(workdir: str | pathlib.Path, abstract_state, step: int | None = None):
    """The `model_state` item (e.g. {'batch_stats': ...}) of a checkpoint (latest by default);
    {} when `abstract_state` is empty (Segmenter)."""
    if not abstract_state:
        return {}
    return _restore_item(workdir, "model_state", abstract_state, step)


def _restore_item(workdir: str | pathlib.Path, item: str, abstract_tree, step: int | None):
    directory = checkpoint_dir(workdir)
    if not directory.exists():
        raise CheckpointNotFoundError(f"no checkpoints in {workdir} (looked in {directory})")
    manager = ocp.CheckpointManager(directory, item_names=(item,))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointNotFoundError(f"no complete checkpoint step in {directory}")
    abstract = jax.tree.map(_as_abstract, abstract_tree)
    restored = manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
    )
    manager.close()
    return restored[item]


def _as_abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
