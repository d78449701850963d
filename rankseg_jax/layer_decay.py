"""Layer-wise learning-rate decay and no-decay groups of unilm's BEiT recipe, for optax.

The fork's `backbones/helpers/LayerDecayOptimizerConstructor.py` (commit fb7a30f) assigns each
parameter, by its mmseg state-dict name and shape:

* a layer id: 0 for `backbone.cls_token` / `mask_token` / `pos_embed` and `backbone.patch_embed.*`,
  i + 1 for `backbone.blocks.i.*`, and L − 1 for everything else (the fpn necks, decode and
  auxiliary heads), where L = num_layers + 2;
* lr = base_lr × decay_rate^(L − 1 − layer_id);
* weight decay 0 if the tensor is 1-D or its name ends in `.bias` (the constructor's
  `name in ('pos_embed', 'cls_token')` test compares the full dotted name and never matches,
  so `backbone.cls_token` (1, 1, D), the relative position bias tables and every 2-D/3-D
  embedding of the heads DO decay), else the base weight decay.

Its `add_params` replaces mmcv's, so the config's `custom_keys` (lr_mult 0.1 for the image
head's `block` and `fc` in the BEiT RankSeg config) are ignored by the official code: those
parameters train at the head's full rate. mmcv's LR hooks then scale each group's initial lr
by the schedule, so the effective rate of a leaf is lr_scale × schedule(t).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from rankseg_jax.convert.mmseg_conv import torch_key


def beit_layer_id(name: str, num_layers: int) -> int:
    """unilm's `get_num_layer_for_vit`; num_layers = depth + 2; name: the full mmseg name."""
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        return 0
    if name.startswith("backbone.patch_embed"):
        return 0
    if name.startswith("backbone.blocks"):
        return int(name.split(".")[2]) + 1
    return num_layers - 1


def layer_decay_group(
    name: str, shape: tuple[int, ...], depth: int, decay_rate: float, weight_decay: float
) -> tuple[float, float]:
    """(lr scale, weight decay) of one parameter under the constructor (module docstring)."""
    num_layers = depth + 2
    layer = beit_layer_id(name, num_layers)
    no_decay = len(shape) == 1 or name.endswith(".bias")
    return decay_rate ** (num_layers - layer - 1), 0.0 if no_decay else weight_decay


def layer_decay_tree(
    params: Any, depth: int, decay_rate: float, weight_decay: float
) -> dict[str, Any]:
    """{'lr_scale': tree, 'weight_decay': tree} of Python floats shaped like `params`.

    params: the model's 'params' collection (arrays or eval_shape structs; only paths and
    shapes are read).
    """
    flat = traverse_util.flatten_dict(dict(params))
    scales, decays = {}, {}
    for path, leaf in flat.items():
        name, _ = torch_key("params", path, len(leaf.shape))
        scales[path], decays[path] = layer_decay_group(
            name, tuple(leaf.shape), depth, decay_rate, weight_decay
        )
    return {
        "lr_scale": traverse_util.unflatten_dict(scales),
        "weight_decay": traverse_util.unflatten_dict(decays),
    }


def _scale_leaves(tree: Any) -> optax.GradientTransformation:
    """updates ← updates × c_leaf for a constant tree c (no state)."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, c: u * jnp.asarray(c, u.dtype), updates, tree), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def adamw_layer_decay(
    schedule: Callable[[jax.Array], jax.Array] | float,
    groups: dict[str, Any],
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """torch AdamW with the constructor's per-parameter groups: θ ← θ − lr_g·(adam + wd_g·θ),
    lr_g = lr_scale × schedule(t). groups: `layer_decay_tree` output."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        _add_leaf_decay(groups["weight_decay"]),
        optax.scale_by_learning_rate(schedule),
        _scale_leaves(groups["lr_scale"]),
    )


def _add_leaf_decay(decay: Any) -> optax.GradientTransformation:
    """updates ← updates + wd_leaf·θ (decoupled weight decay before the lr, as torch AdamW)."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("weight decay needs the params: call update(grads, state, params)")
        out = jax.tree.map(
            lambda u, p, wd: u if wd == 0 else u + jnp.asarray(wd, u.dtype) * p.astype(u.dtype),
            updates,
            params,
            decay,
        )
        return out, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
