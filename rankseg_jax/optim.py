"""The optimisers of the official recipes (spec section 5, issue #18) as optax transformations.

* SGD, momentum 0.9, dampening 0, no Nesterov, with COUPLED per-parameter weight decay as
  torch.optim.SGD applies it: g ← g + wd·θ; buf ← 0.9·buf + g (the first step sets buf = g);
  θ ← θ − lr_t·buf.
* Per-parameter weight decay by mmcv 1.3.12 `DefaultOptimizerConstructor` custom keys, matched
  on the mmseg state-dict name of each leaf (`convert.mmseg.torch_name`): keys sorted longest
  first (ties alphabetical), the first key that is a substring of the name wins, wd = base ×
  decay_mult; unmatched parameters get the base wd. The backbone LayerNorms are called
  ln1/ln2, so the 'norm' key makes only head norms decay-free.
* Poly learning rate: lr_t = (lr − min_lr)·(1 − t/T)^power + min_lr, t the number of updates
  already done, no warmup (mmcv's linear warmup from `schedule.warmup_ratio` × lr when
  `schedule.warmup_steps` > 0).
* "adamw" (the demo, Swin and BEiT configs): Adam with DECOUPLED weight decay from the same
  per-leaf tree (lr_t·wd·θ subtracted, torch.optim.AdamW / optax.adamw semantics, betas
  `optimizer.betas`, eps 1e-8); a multiplier of 0 masks a leaf out.
* Per-parameter learning rates, `optimizer.constructor`:
  - "default": mmcv's custom keys carry lr_mult as well (`optimizer.lr_mult` pairs, e.g. the
    RankSeg image head's `block` / `fc` × 0.1 of the Swin row). `decay_mult` and `lr_mult`
    form ONE custom-keys dict: the first key in mmcv order that is a substring of the name
    decides both multipliers (a key that names only one leaves the other at 1.0). So with
    the Swin row's keys, `decode_head.img_cls_head.block.0.norm1.weight` matches the longer
    `block.` key: lr × 0.1 and FULL weight decay, exactly as mmcv 1.3.12 assigns it.
  - "layer_decay": unilm's `LayerDecayOptimizerConstructor` (layer_decay.py, the BEiT rows):
    lr multiplier decay_rate^(L − 1 − layer id), L = `layer_decay_num_layers` + 2, weight
    decay 0 for 1-D tensors and biases. That constructor replaces mmcv's `add_params`, so
    custom keys are not used: `decay_mult` / `lr_mult` must be empty (ConfigError otherwise).
  mmcv's lr hook applies the schedule to each group's own initial lr m·lr, so a leaf's rate is
  warm(t)·((m·lr − min_lr)·coeff(t) + min_lr) (= m × the base schedule when min_lr = 0).
* `optimizer.grad_clip_norm` > 0 clips the gradient to that global norm before anything else
  (torch.nn.utils.clip_grad_norm_ before optimizer.step; the reference uses none).
* `optimizer.grad_accum_steps` = n > 1 wraps everything in `optax.MultiSteps`: call `update`
  once per micro-batch; every n-th call applies one update on the MEAN of the n gradients
  (clip and weight decay see that mean; the other calls return zero updates). As mmcv's
  runner with the BEiT recipe's `DistOptimizerHook(update_interval=n)`, `total_steps` and
  `schedule.warmup_steps` count ITERATIONS (micro-batches) and the u-th update (0-based)
  uses the lr of iteration n·u + n − 1, the iteration that steps the optimiser; so a run of
  total_steps iterations makes total_steps / n updates along the whole schedule. The opt
  state holds one accumulated gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rankseg_jax import layer_decay
from rankseg_jax.convert import mmseg, mmseg_conv
from rankseg_jax.errors import ConfigError
from rankseg_jax.sharding import key_name

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("poly",)
CONSTRUCTORS = ("default", "layer_decay")


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


# --------------------------------------------------------------------------------------------
# Per-parameter groups (lr multiplier, weight decay)
# --------------------------------------------------------------------------------------------


def custom_keys(
    decay_mult: Sequence[Sequence[Any]], lr_mult: Sequence[Sequence[Any]] = ()
) -> list[tuple[str, float, float]]:
    """mmcv's custom-keys dict from the two config lists, in match order (longest first, ties
    alphabetical): (substring, lr multiplier, decay multiplier); a key in only one list has
    1.0 for the other multiplier, as `custom_keys[key].get('lr_mult', 1.)` gives."""
    lrs = dict(sorted_decay_keys(lr_mult)) if lr_mult else {}
    decays = dict(sorted_decay_keys(decay_mult)) if decay_mult else {}
    names = sorted(sorted(set(lrs) | set(decays)), key=len, reverse=True)
    return [(key, lrs.get(key, 1.0), decays.get(key, 1.0)) for key in names]


def custom_group(
    name: str, keys: list[tuple[str, float, float]], base_wd: float
) -> tuple[float, float]:
    """(lr multiplier, weight decay) of one parameter under mmcv 1.3.12's custom keys."""
    for key, lr_m, decay_m in keys:
        if key in name:
            return lr_m, base_wd * decay_m
    return 1.0, float(base_wd)


def uses_segmenter_names(model_config: ml_collections.ConfigDict) -> bool:
    """Whether the param tree follows the Segmenter layout (convert/mmseg.py); the other
    families name their modules after mmseg's (convert/mmseg_conv.py)."""
    return model_config.decode_head == "mask_transformer"


def leaf_name(path: Sequence[Any], ndim: int, segmenter_names: bool, gt_head: bool) -> str:
    """The mmseg state-dict name of a param leaf (tree_util key path) — what mmcv matches."""
    if segmenter_names:
        return mmseg_name(flax_path(path), gt_head)
    names = tuple(key_name(entry) for entry in path)
    if names and names[0] == "params":
        names = names[1:]
    return mmseg_conv.torch_key("params", names, ndim)[0]


def param_groups(
    params: Any, config: ml_collections.ConfigDict, gt_head: bool | None = None
) -> dict[str, Any]:
    """{'lr_mult': tree, 'weight_decay': tree} of Python floats shaped like `params` (arrays or
    shape structs: only paths and shapes are read), under `optimizer.constructor`."""
    opt = config.optimizer
    check_optimizer_config(config)
    if opt.constructor == "layer_decay":
        groups = layer_decay.layer_decay_tree(
            params, int(opt.layer_decay_num_layers), float(opt.layer_decay_rate),
            float(opt.weight_decay),
        )  # fmt: skip
        return {"lr_mult": groups["lr_scale"], "weight_decay": groups["weight_decay"]}
    if gt_head is None:
        gt_head = config.model.classifier == "gt"
    segmenter_names = uses_segmenter_names(config.model)
    keys = custom_keys(opt.decay_mult, opt.lr_mult)
    base_wd = float(opt.weight_decay)
    pairs = jax.tree_util.tree_map_with_path(
        lambda path, leaf: custom_group(
            leaf_name(path, len(leaf.shape), segmenter_names, gt_head), keys, base_wd
        ),
        params,
    )
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    return {
        "lr_mult": jax.tree.map(lambda pair: pair[0], pairs, is_leaf=is_pair),
        "weight_decay": jax.tree.map(lambda pair: pair[1], pairs, is_leaf=is_pair),
    }


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def poly_group_schedule(
    lr: float,
    total_steps: int,
    power: float = 0.9,
    min_lr: float = 1e-5,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.1,
) -> Callable[[jax.Array, float], jax.Array]:
    """mmcv `PolyLrUpdaterHook` (by_epoch False) for a param group of initial lr m·lr:
    (count, m) → warm(t)·((m·lr − min_lr)·(1 − t/T)^power + min_lr).

    t = updates already done (optax's count), T = total_steps; t ≥ T gives min_lr. With
    warmup_steps W > 0, mmcv's 'linear' warmup factor warm(t) = 1 − (1 − t/W)·(1 −
    warmup_ratio) for t < W (warmup_ratio at t = 0), 1 after. Jittable.
    """
    if total_steps <= 0:
        raise ConfigError(f"total_steps={total_steps} must be positive for the poly schedule")
    if warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps={warmup_steps} must be ≥ 0")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ConfigError(f"schedule.warmup_ratio={warmup_ratio} must be in [0, 1]")

    def schedule(count, mult=1.0):
        t = jnp.asarray(count, jnp.float32)
        # (T − t) / T: exact in float32 up to 2^24 steps, unlike 1 − t/T near the end.
        progress = jnp.clip((float(total_steps) - t) / float(total_steps), 0.0, 1.0)
        value = (mult * lr - min_lr) * progress**power + min_lr
        if warmup_steps > 0:
            # mmcv's 1 − (1 − t/W)(1 − ratio), written as ratio + (1 − ratio)·t/W: the same
            # number, without float32's cancellation (1 − 0.999999 is 1.3 % off 1e-6).
            factor = warmup_ratio + (1.0 - warmup_ratio) * (t / float(warmup_steps))
            value = jnp.where(t < warmup_steps, value * factor, value)
        return value

    return schedule


def poly_schedule(
    lr: float,
    total_steps: int,
    power: float = 0.9,
    min_lr: float = 1e-5,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.1,
) -> Callable[[jax.Array], jax.Array]:
    """The base group's (m = 1) lr of `poly_group_schedule`: a jittable optax schedule."""
    group = poly_group_schedule(lr, total_steps, power, min_lr, warmup_steps, warmup_ratio)
    return lambda count: group(count, 1.0)


def _group_schedule(config: ml_collections.ConfigDict) -> Callable[[jax.Array, float], jax.Array]:
    sched = config.schedule
    if sched.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={sched.name!r} is not one of {', '.join(SCHEDULES)}")
    return poly_group_schedule(
        float(config.optimizer.lr),
        int(config.total_steps),
        power=float(sched.power),
        min_lr=float(sched.min_lr),
        warmup_steps=int(sched.warmup_steps),
        warmup_ratio=float(sched.warmup_ratio),
    )


def make_schedule(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
    """The base lr schedule of a full config (`optimizer.lr`, `schedule.*`, `total_steps`);
    a group with multiplier m follows `_group_schedule(config)(count, m)`."""
    group = _group_schedule(config)
    return lambda count: group(count, 1.0)


def group_learning_rates(params: Any, config: ml_collections.ConfigDict, count: int) -> Any:
    """The lr every leaf of `params` gets at iteration `count` (a tree of floats; for logs and
    tests): the group schedule at that leaf's multiplier."""
    group = _group_schedule(config)
    return jax.tree.map(lambda m: float(group(count, m)), param_groups(params, config)["lr_mult"])


# --------------------------------------------------------------------------------------------
# The optimiser
# --------------------------------------------------------------------------------------------


def _add_group_decay(groups_fn: Callable[[Any], dict]) -> optax.GradientTransformation:
    """updates ← updates + wd_leaf·θ, wd_leaf from the params' own paths (read at trace time,
    so the per-leaf values are compile-time constants; no state)."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "per-leaf weight decay needs the params: call update(grads, state, params)"
            )
        decay = groups_fn(params)["weight_decay"]
        updates = jax.tree.map(
            lambda g, p, wd: g if wd == 0 else g + jnp.asarray(wd, g.dtype) * p.astype(g.dtype),
            updates,
            params,
            decay,
        )
        return updates, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def _scale_by_group_lr(
    schedule: Callable[[jax.Array, float], jax.Array],
    groups_fn: Callable[[Any], dict],
    accum_steps: int = 1,
) -> optax.GradientTransformation:
    """updates ← −lr_leaf(t)·updates, lr_leaf = schedule(t, m_leaf), t = n·count + n − 1 the
    iteration of this update (n = accum_steps; count = updates done); state: the count."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("per-leaf lr needs the params: call update(grads, state, params)")
        mults = groups_fn(params)["lr_mult"]
        iteration = accum_steps * state.count + (accum_steps - 1)
        rates = {m: schedule(iteration, m) for m in set(jax.tree.leaves(mults))}
        updates = jax.tree.map(lambda u, m: -rates[m].astype(u.dtype) * u, updates, mults)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def check_optimizer_config(config: ml_collections.ConfigDict) -> None:
    """ConfigError (one line naming the key) for optimizer settings that cannot work."""
    opt = config.optimizer
    if opt.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={opt.name!r} is not one of {', '.join(OPTIMIZERS)}")
    if opt.constructor not in CONSTRUCTORS:
        raise ConfigError(
            f"optimizer.constructor={opt.constructor!r} is not one of {', '.join(CONSTRUCTORS)}"
        )
    if opt.constructor == "layer_decay":
        if opt.layer_decay_num_layers < 1 or not 0 < opt.layer_decay_rate <= 1:
            raise ConfigError(
                "optimizer.constructor='layer_decay' needs optimizer.layer_decay_num_layers ≥ 1 "
                f"and 0 < layer_decay_rate ≤ 1 (got {opt.layer_decay_num_layers}, "
                f"{opt.layer_decay_rate})"
            )
        if tuple(opt.decay_mult) or tuple(opt.lr_mult):
            raise ConfigError(
                "optimizer.decay_mult / optimizer.lr_mult must be () with constructor="
                "'layer_decay' (unilm's constructor replaces mmcv's custom keys)"
            )
    if len(tuple(opt.betas)) != 2 or not all(0 <= b < 1 for b in opt.betas):
        raise ConfigError(f"optimizer.betas={tuple(opt.betas)} must be two numbers in [0, 1)")
    if opt.grad_clip_norm < 0:
        raise ConfigError(f"optimizer.grad_clip_norm={opt.grad_clip_norm} must be ≥ 0")
    if opt.grad_accum_steps < 1:
        raise ConfigError(f"optimizer.grad_accum_steps={opt.grad_accum_steps} must be ≥ 1")


def make_optimizer(
    config: ml_collections.ConfigDict, gt_head: bool | None = None
) -> optax.GradientTransformation:
    """The optax transformation for a full config (see the module docstring).

    Reads optimizer.{name, lr, momentum, betas, weight_decay, decay_mult, lr_mult, constructor,
    layer_decay_rate, layer_decay_num_layers, grad_clip_norm, grad_accum_steps}, schedule.*,
    total_steps, and model.{decode_head, classifier} (which param naming; the GT head's
    mask_norm names, unless `gt_head` is given). Call `update(grads, state, params)`: the
    per-leaf weight decay and lr need the params' paths.
    """
    opt = config.optimizer
    check_optimizer_config(config)
    schedule = _group_schedule(config)

    def groups_fn(params):
        return param_groups(params, config, gt_head)

    decay = _add_group_decay(groups_fn)
    if opt.name == "sgd":
        chain = [decay, optax.trace(decay=float(opt.momentum), nesterov=False)]
    else:
        b1, b2 = (float(b) for b in opt.betas)
        chain = [optax.scale_by_adam(b1=b1, b2=b2, eps=1e-8), decay]
    chain.append(_scale_by_group_lr(schedule, groups_fn, int(opt.grad_accum_steps)))
    if opt.grad_clip_norm > 0:
        chain.insert(0, optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    tx = optax.chain(*chain)
    if opt.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(opt.grad_accum_steps))
        return tx.gradient_transformation()
    return tx
