"""The optimiser of the reference recipe (spec section 5) as an optax transformation.

* SGD, momentum 0.9, dampening 0, no Nesterov, with COUPLED per-parameter weight decay as
  torch.optim.SGD applies it: g ← g + wd·θ; buf ← 0.9·buf + g (the first step sets buf = g);
  θ ← θ − lr_t·buf.
* Per-parameter weight decay by mmcv 1.3.12 `DefaultOptimizerConstructor` custom keys, matched
  on the mmseg state-dict name of each leaf (`convert.mmseg.torch_name`): keys sorted longest
  first (ties alphabetical), the first key that is a substring of the name wins, wd = base ×
  decay_mult; unmatched parameters get the base wd. The backbone LayerNorms are called
  ln1/ln2, so the 'norm' key makes only head norms decay-free.
* Poly learning rate: lr_t = (lr − min_lr)·(1 − t/T)^power + min_lr, t the number of updates
  already done, no warmup (mmcv's linear warmup when `schedule.warmup_steps` > 0).
* "adamw" (the demo config): Adam with DECOUPLED weight decay from the same per-leaf tree
  (lr_t·wd·θ subtracted, torch.optim.AdamW / optax.adamw semantics, betas (0.9, 0.999), eps
  1e-8); a multiplier of 0 masks a leaf out.
* `optimizer.grad_clip_norm` > 0 clips the gradient to that global norm before anything else
  (torch.nn.utils.clip_grad_norm_ before optimizer.step; the reference uses none).
* `optimizer.grad_accum_steps` = n > 1 wraps everything in `optax.MultiSteps`: call `update`
  once per micro-batch; every n-th call applies one update on the MEAN of the n gradients
  (clip, weight decay and the lr schedule see that mean and count real updates only; the
  other calls return zero updates). `total_steps` then counts real updates, so a run of T
  optimiser steps makes n·T `update` calls. The opt state holds one accumulated gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rankseg_jax.convert import mmseg
from rankseg_jax.errors import ConfigError
from rankseg_jax.sharding import key_name

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly",)


# --------------------------------------------------------------------------------------------
# Per-parameter weight decay (mmcv custom keys)
# --------------------------------------------------------------------------------------------


def flax_path(path: Sequence[Any]) -> str:
    """'/'-joined Flax param path of a tree_util key path (a leading 'params' is dropped)."""
    names = [key_name(entry) for entry in path]
    if names and names[0] == "params":
        names = names[1:]
    return "/".join(names)


def mmseg_name(path: str, gt_head: bool = False) -> str:
    """The mmseg state-dict name of a Flax param path; the dotted path itself if it has none
    (a parameter the mapping does not know still gets the substring rules)."""
    try:
        return mmseg.torch_name(path, gt_head)[0]
    except KeyError:
        return path.replace("/", ".")


def sorted_decay_keys(decay_mult: Sequence[Sequence[Any]]) -> list[tuple[str, float]]:
    """(substring, multiplier) pairs in mmcv's match order: longest first, ties alphabetical."""
    pairs = {}
    for item in decay_mult:
        if len(item) != 2:
            raise ConfigError(
                f"optimizer.decay_mult entries must be (substring, multiplier) pairs, got {item!r}"
            )
        pairs[str(item[0])] = float(item[1])
    return [(key, pairs[key]) for key in sorted(sorted(pairs), key=len, reverse=True)]


def _first_match(name: str, keys: list[tuple[str, float]], base_wd: float) -> float:
    return next((base_wd * mult for key, mult in keys if key in name), float(base_wd))


def decay_for_name(name: str, base_wd: float, decay_mult: Sequence[Sequence[Any]]) -> float:
    """base_wd × the multiplier of the first key (mmcv order) that is a substring of name."""
    return _first_match(name, sorted_decay_keys(decay_mult), base_wd)


def weight_decay_tree(
    params: Any, base_wd: float, decay_mult: Sequence[Sequence[Any]], gt_head: bool = False
) -> Any:
    """A pytree like params with each leaf's weight decay (Python float).

    Works on arrays or shape structs (jax.eval_shape output): only the paths are read.
    `decay_mult` is config.optimizer.decay_mult, e.g. (("pos_embed", 0.0), ("norm", 0.0)).
    """
    keys = sorted_decay_keys(decay_mult)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _first_match(mmseg_name(flax_path(path), gt_head), keys, base_wd), params
    )


def add_per_leaf_weight_decay(
    base_wd: float, decay_mult: Sequence[Sequence[Any]], gt_head: bool = False
) -> optax.GradientTransformation:
    """updates ← updates + wd_leaf·params, wd_leaf from `weight_decay_tree` of the params' own
    paths (read at trace time, so the per-leaf values are compile-time constants; no state)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "per-leaf weight decay needs the params: call update(grads, state, params)"
            )
        decay = weight_decay_tree(params, base_wd, decay_mult, gt_head)
        updates = jax.tree.map(
            lambda g, p, wd: g if wd == 0 else g + jnp.asarray(wd, g.dtype) * p.astype(g.dtype),
            updates,
            params,
            decay,
        )
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def poly_schedule(
    lr: float,
    total_steps: int,
    power: float = 0.9,
    min_lr: float = 1e-5,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.1,
) -> Callable[[jax.Array], jax.Array]:
    """mmcv `PolyLrUpdaterHook` (by_epoch False): lr_t = (lr − min_lr)·(1 − t/T)^power + min_lr.

    t = updates already done (optax's count), T = total_steps; t ≥ T gives min_lr. With
    warmup_steps W > 0, mmcv's 'linear' warmup multiplies lr_t by 1 − (1 − t/W)·(1 −
    warmup_ratio) for t < W (warmup_ratio at t = 0). Returns a jittable optax schedule.
    """
    if total_steps <= 0:
        raise ConfigError(f"total_steps={total_steps} must be positive for the poly schedule")
    if warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps={warmup_steps} must be ≥ 0")

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        # (T − t) / T: exact in float32 up to 2^24 steps, unlike 1 − t/T near the end.
        progress = jnp.clip((float(total_steps) - t) / float(total_steps), 0.0, 1.0)
        value = (lr - min_lr) * progress**power + min_lr
        if warmup_steps > 0:
            factor = 1.0 - (1.0 - t / float(warmup_steps)) * (1.0 - warmup_ratio)
            value = jnp.where(t < warmup_steps, value * factor, value)
        return value

    return schedule


def make_schedule(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """The lr schedule of a full config (`optimizer.lr`, `schedule.*`, `total_steps`)."""
    sched = config.schedule
    if sched.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={sched.name!r} is not one of {', '.join(SCHEDULES)}")
    return poly_schedule(
        float(config.optimizer.lr),
        int(config.total_steps),
        power=float(sched.power),
        min_lr=float(sched.min_lr),
        warmup_steps=int(sched.warmup_steps),
    )


# --------------------------------------------------------------------------------------------
# The optimiser
# --------------------------------------------------------------------------------------------


def make_optimizer(
    config: ml_collections.ConfigDict, gt_head: bool | None = None
) -> optax.GradientTransformation:
    """The optax transformation for a full config (see the module docstring).

    Reads optimizer.{name, lr, momentum, weight_decay, decay_mult, grad_clip_norm,
    grad_accum_steps}, schedule.*, total_steps, and model.classifier (for the GT head's mask_norm
    names, unless `gt_head` is given). Call `update(grads, state, params)`: the weight decay
    needs the params.
    """
    opt = config.optimizer
    if gt_head is None:
        gt_head = config.model.classifier == "gt"
    schedule = make_schedule(config)
    decay = add_per_leaf_weight_decay(float(opt.weight_decay), opt.decay_mult, gt_head)
    if opt.name == "sgd":
        chain = [decay, optax.trace(decay=float(opt.momentum), nesterov=False)]
    elif opt.name == "adamw":
        chain = [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), decay]
    else:
        raise ConfigError(f"optimizer.name={opt.name!r} is not one of {', '.join(OPTIMIZERS)}")
    chain.append(optax.scale_by_learning_rate(schedule))
    if opt.grad_clip_norm < 0:
        raise ConfigError(f"optimizer.grad_clip_norm={opt.grad_clip_norm} must be ≥ 0")
    if opt.grad_clip_norm > 0:
        chain.insert(0, optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    tx = optax.chain(*chain)
    if opt.grad_accum_steps < 1:
        raise ConfigError(f"optimizer.grad_accum_steps={opt.grad_accum_steps} must be ≥ 1")
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(opt.grad_accum_steps))
        return tx.gradient_transformation()
    return tx
