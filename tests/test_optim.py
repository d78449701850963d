"""rankseg_jax.optim: mmcv weight-decay groups, poly schedule, SGD/AdamW against torch.optim.

Tolerances: schedule values within 1e-6 relative of the float64 formula; parameters after
three float32 steps within 1e-6 absolute of torch for SGD (measured 5e-7, params of order 1),
5e-6 for AdamW (measured 2e-6); gradient accumulation within 1e-6 of a single step on the
mean gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import ade20k_segmenter, pascal_context
from rankseg_jax import optim, recipes
from rankseg_jax.convert import mmseg
from rankseg_jax.errors import ConfigError
from rankseg_jax.models.segmenter import create_model


def param_shapes(config):
    """The model's param tree as shape structs (no allocation)."""
    model = create_model(config.model)
    images = jnp.zeros((1, *config.model.img_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)["params"]


def mmcv_weight_decay(name, base_wd, custom_keys):
    """mmcv 1.3.12 DefaultOptimizerConstructor.add_params, custom-keys branch, transcribed."""
    sorted_keys = sorted(sorted(custom_keys.keys()), key=len, reverse=True)
    for key in sorted_keys:
        if key in name:
            return base_wd * custom_keys[key].get("decay_mult", 1.0)
    return base_wd


def count_by_decay(shapes, wd_tree):
    counts = {}
    for shape, wd in zip(jax.tree.leaves(shapes), jax.tree.leaves(wd_tree), strict=True):
        key = round(wd, 12)
        counts[key] = counts.get(key, 0) + int(np.prod(shape.shape))
    return counts


# --------------------------------------------------------------------------------------------
# Weight-decay groups
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, expected",
    [
        (ade20k_segmenter, {1e-4: 7_203_222, 0.0: 797_284, 1e-6: 101_701_632}),
        (pascal_context, {1e-4: 7_134_012, 0.0: 797_234, 1e-6: 101_632_512}),
    ],
)
def test_rankseg_weight_decay_groups(module, expected):
    config = module.get_config("head=rankseg")
    shapes = param_shapes(config)
    tree = optim.weight_decay_tree(
        shapes, config.optimizer.weight_decay, config.optimizer.decay_mult
    )
    assert count_by_decay(shapes, tree) == {round(k, 12): v for k, v in expected.items()}


def test_decay_of_named_parameters_follows_mmcv():
    config = ade20k_segmenter.get_config("head=rankseg")
    shapes = param_shapes(config)
    tree = optim.weight_decay_tree(shapes, 1e-6, config.optimizer.decay_mult)
    flat = {
        mmseg.torch_name("/".join(k))[0]: v for k, v in traverse_util.flatten_dict(tree).items()
    }
    custom = {key: dict(decay_mult=mult) for key, mult in config.optimizer.decay_mult}
    for name, wd in flat.items():
        assert wd == mmcv_weight_decay(name, 1e-6, custom), name
    assert flat["backbone.layers.3.ln1.weight"] == 1e-6  # backbone LNs are not "norm"
    assert flat["backbone.layers.3.ln2.bias"] == 1e-6
    assert flat["backbone.ln1.weight"] == 1e-6
    assert flat["backbone.pos_embed"] == 0.0
    assert flat["backbone.cls_token"] == 0.0
    assert flat["decode_head.cls_emb"] == 1e-6  # "cls_token" does not match cls_emb
    assert flat["decode_head.blocks.0.norm1.weight"] == pytest.approx(1e-4)  # longer key wins
    assert flat["decode_head.blocks.1.norm1.weight"] == 0.0
    assert flat["decode_head.mask_norm.bias"] == 0.0
    assert flat["decode_head.ml_fc.W"] == pytest.approx(1e-4)


def test_decay_keys_sorted_longest_first_ties_alphabetical():
    pairs = (("norm", 0.0), ("ab", 2.0), ("ba", 3.0), ("abc", 4.0))
    assert [k for k, _ in optim.sorted_decay_keys(pairs)] == ["norm", "abc", "ab", "ba"]
    assert optim.decay_for_name("x.bab.y", 1.0, pairs) == 2.0  # "ab" before "ba" (tie)
    assert optim.decay_for_name("x.abc.norm", 1.0, pairs) == 0.0  # longest key first
    assert optim.decay_for_name("other", 0.5, pairs) == 0.5
    with pytest.raises(ConfigError, match="decay_mult"):
        optim.sorted_decay_keys((("norm", 0.0, 1.0),))


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def mmcv_poly_lr(base_lr, progress, max_progress, power, min_lr):
    """mmcv PolyLrUpdaterHook.get_lr, transcribed (float64)."""
    coeff = (1 - progress / max_progress) ** power
    return (base_lr - min_lr) * coeff + min_lr


@pytest.mark.parametrize("total", [160_000, 80_000, 10])
def test_poly_schedule_values(total):
    schedule = optim.poly_schedule(1e-3, total, power=0.9, min_lr=1e-5)
    for t in (0, total // 2, total - 1):
        formula = (1e-3 - 1e-5) * (1 - t / total) ** 0.9 + 1e-5
        got = float(schedule(jnp.asarray(t)))
        np.testing.assert_allclose(got, formula, rtol=1e-6)
        np.testing.assert_allclose(got, mmcv_poly_lr(1e-3, t, total, 0.9, 1e-5), rtol=1e-6)
    assert float(schedule(0)) == pytest.approx(1e-3, rel=1e-7)
    assert float(schedule(total)) == pytest.approx(1e-5, rel=1e-6)
    assert float(schedule(total + 5)) == pytest.approx(1e-5, rel=1e-6)


def test_poly_schedule_warmup_is_mmcv_linear():
    schedule = optim.poly_schedule(1e-3, 100, warmup_steps=10)
    plain = optim.poly_schedule(1e-3, 100)
    for t in (0, 5, 9):
        factor = 1 - (1 - t / 10) * (1 - 0.1)
        np.testing.assert_allclose(float(schedule(t)), float(plain(t)) * factor, rtol=1e-6)
    assert float(schedule(10)) == float(plain(10))


# --------------------------------------------------------------------------------------------
# SGD / AdamW against torch.optim
# --------------------------------------------------------------------------------------------


def small_config(name="sgd", **optimizer):
    config = ade20k_segmenter.get_config("head=rankseg,runlocal")
    with config.unlocked():
        config.optimizer.update(name=name, lr=0.1, weight_decay=0.01, **optimizer)
        config.total_steps = 5
    return config


def random_tree(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes
    )


def torch_groups(torch, state, base_wd, decay_mult):
    """torch params grouped by their mmcv weight decay (one group per parameter)."""
    custom = {key: dict(decay_mult=mult) for key, mult in decay_mult}
    tensors = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in state.items()}
    groups = [
        dict(params=[t], weight_decay=mmcv_weight_decay(k, base_wd, custom))
        for k, t in tensors.items()
    ]
    return tensors, groups


def run_both(torch, config, steps=3, clip=0.0):
    shapes = param_shapes(config)
    params = random_tree(shapes, 0)
    grads = [random_tree(shapes, 1 + i, scale=0.5) for i in range(steps)]
    tx = optim.make_optimizer(config)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)

    opt = config.optimizer
    start = mmseg.params_to_state_dict(jax.tree.map(np.asarray, random_tree(shapes, 0)))
    tensors, groups = torch_groups(torch, start, opt.weight_decay, opt.decay_mult)
    if opt.name == "sgd":
        torch_opt = torch.optim.SGD(groups, lr=opt.lr, momentum=0.9)
    else:
        torch_opt = torch.optim.AdamW(groups, lr=opt.lr, betas=(0.9, 0.999), eps=1e-8)
    for t, g in enumerate(grads):
        state_dict = mmseg.params_to_state_dict(jax.tree.map(np.asarray, g))
        for key, tensor in tensors.items():
            tensor.grad = torch.tensor(np.array(state_dict[key]))
        if clip:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), clip)
        for group in torch_opt.param_groups:  # mmcv's hook sets the lr before each step
            group["lr"] = mmcv_poly_lr(opt.lr, t, config.total_steps, 0.9, 1e-5)
        torch_opt.step()
    ours = mmseg.params_to_state_dict(jax.tree.map(np.asarray, params))
    return ours, {k: v.detach().numpy() for k, v in tensors.items()}, start


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_matches_torch_with_param_groups(torch, name):
    config = small_config(name, decay_mult=recipes.RANKSEG_DECAY_MULT)
    ours, theirs, start = run_both(torch, config)
    # AdamW: optax computes the bias corrections 1 − βᵗ in float32 (torch in float64), a
    # relative 1e-5 on 1 − 0.999; measured 2e-6 after 3 steps that move params by ~1.
    atol = 1e-6 if name == "sgd" else 5e-6
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], atol=atol, rtol=0, err_msg=key)
    # The per-leaf decay mattered: a wd-100x leaf moved differently from a wd-0 one.
    assert not np.allclose(ours["decode_head.ml_fc.W"], start["decode_head.ml_fc.W"])


def test_sgd_with_grad_clipping_matches_torch(torch):
    config = small_config("sgd", grad_clip_norm=1.0)
    ours, theirs, _ = run_both(torch, config, steps=2, clip=1.0)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-6, rtol=0, err_msg=key)


def test_grad_accumulation_equals_one_step_on_the_mean():
    """Clip, weight decay and momentum see the mean gradient; a constant lr (power 0) so that
    the schedule's iteration count (tested in test_optim_recipes.py) plays no part."""
    config = small_config("sgd", grad_clip_norm=5.0, decay_mult=recipes.RANKSEG_DECAY_MULT)
    with config.unlocked():
        config.schedule.power = 0.0
    shapes = param_shapes(config)
    params = random_tree(shapes, 0)
    g1, g2 = random_tree(shapes, 1), random_tree(shapes, 2)

    plain = optim.make_optimizer(config)
    warm = random_tree(shapes, 3)  # one earlier step so the momentum buffer is not empty
    state = plain.init(params)
    update = jax.jit(plain.update)
    _, state = update(warm, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    expected, _ = update(mean, state, params)

    with config.unlocked():
        config.optimizer.grad_accum_steps = 2
    accum = optim.make_optimizer(config)
    state = accum.init(params)
    update = jax.jit(accum.update)
    for g in (warm, warm):
        _, state = update(g, state, params)
    first, state = update(g1, state, params)
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(first))
    got, _ = update(g2, state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


def test_bad_optimizer_settings_raise_config_errors():
    config = small_config("lamb")
    with pytest.raises(ConfigError, match="optimizer.name='lamb'"):
        optim.make_optimizer(config)
    config = small_config("sgd")
    with config.unlocked():
        config.schedule.name = "cosine"
    with pytest.raises(ConfigError, match="schedule.name='cosine'"):
        optim.make_optimizer(config)
    config = small_config("sgd", grad_accum_steps=0)
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        optim.make_optimizer(config)
