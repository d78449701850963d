"""The optimisers of the Swin and BEiT UperNet recipes (issue #18) through `optim.make_optimizer`.

Per-parameter (lr multiplier, weight decay) of the small official-family models against the
official constructors' rules written out below (mmcv 1.3.12 `DefaultOptimizerConstructor`
custom keys; unilm's `LayerDecayOptimizerConstructor` at fork commit fb7a30f), keyed by the
official state dicts' names; the lr of each group at warm-up / decay steps against mmcv's
`PolyLrUpdaterHook` + linear warm-up formula (float64); AdamW steps against torch.optim.AdamW
(float64) with those groups. Tolerance of the steps: 2e-5 of each tensor's largest move
(measured 8.1e-6: optax's bias correction uses β2 = 0.999 rounded to float32, so 1 − β2 is off
by 1.3e-5 relative and √v̂ by half that; torch's is float64).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rankseg_jax import config as config_lib
from rankseg_jax import optim
from rankseg_jax.convert.mmseg_upernet import variables_to_state_dict
from rankseg_jax.convert.segmenter_layout import state_dict_from_checkpoint
from rankseg_jax.convert.torch_pickle import load_pth
from rankseg_jax.errors import ConfigError
from rankseg_jax.models.uper import small_upernet

BUFFERS = ("relative_position_index", "running_mean", "running_var", "num_batches_tracked")

# The fb7a30f Swin RankSeg row (= mmseg's Swin AdamW) with its image-head lr_mult keys.
SWIN_DECAY_MULT = (
    ("absolute_pos_embed", 0.0),
    ("relative_position_bias_table", 0.0),
    ("norm", 0.0),
)
SWIN_LR_MULT = (("decode_head.img_cls_head.block.", 0.1), ("decode_head.img_cls_head.fc", 0.1))


# --------------------------------------------------------------------------------------------
# The official rules, transcribed
# --------------------------------------------------------------------------------------------


def mmcv_custom_keys_group(name, base_lr, base_wd, custom_keys):
    """mmcv 1.3.12 DefaultOptimizerConstructor.add_params, custom-keys branch: (lr, wd)."""
    for key in sorted(sorted(custom_keys.keys()), key=len, reverse=True):
        if key in name:
            lr = base_lr * custom_keys[key].get("lr_mult", 1.0)
            wd = base_wd * custom_keys[key].get("decay_mult", 1.0)
            return lr, wd
    return base_lr, base_wd


def unilm_layer_decay_group(name, shape, base_lr, base_wd, num_layers, rate):
    """fb7a30f LayerDecayOptimizerConstructor.add_params: (lr, wd) of one parameter."""
    num_layers = num_layers + 2
    if len(shape) == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token"):
        wd = 0.0
    else:
        wd = base_wd
    if name in ("backbone.cls_token", "backbone.mask_token", "backbone.pos_embed"):
        layer_id = 0
    elif name.startswith("backbone.patch_embed"):
        layer_id = 0
    elif name.startswith("backbone.blocks"):
        layer_id = int(name.split(".")[2]) + 1
    else:
        layer_id = num_layers - 1
    return base_lr * rate ** (num_layers - layer_id - 1), wd


def mmcv_lr(initial_lr, it, max_iters, power, min_lr, warmup_iters, warmup_ratio):
    """PolyLrUpdaterHook.get_lr then the 'linear' warm-up of LrUpdaterHook (float64)."""
    regular = (initial_lr - min_lr) * (1 - it / max_iters) ** power + min_lr
    if it < warmup_iters:
        k = (1 - it / warmup_iters) * (1 - warmup_ratio)
        return regular * (1 - k)
    return regular


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def recipe_config(**overrides):
    """A full config with the given optimizer / schedule values; the model part names a
    non-Segmenter head (the optimiser only reads model.decode_head / classifier)."""
    config = config_lib.with_defaults(
        dict(
            total_steps=overrides.pop("total_steps", 100),
            optimizer=overrides.pop("optimizer"),
            schedule=overrides.pop("schedule"),
        )
    )
    with config.unlocked():
        config.model.decode_head = "uper"
    return config


def swin_config(**schedule):
    return recipe_config(
        optimizer=dict(
            name="adamw",
            lr=6e-5,
            betas=(0.9, 0.999),
            weight_decay=0.01,
            decay_mult=SWIN_DECAY_MULT,
            lr_mult=SWIN_LR_MULT,
        ),
        schedule=dict(dict(power=1.0, min_lr=0.0, warmup_steps=3, warmup_ratio=1e-6), **schedule),
        total_steps=10,
    )


def beit_config():
    return recipe_config(
        optimizer=dict(
            name="adamw",
            lr=2e-5,
            betas=(0.9, 0.999),
            weight_decay=0.05,
            decay_mult=(),
            lr_mult=(),
            constructor="layer_decay",
            layer_decay_rate=0.95,
            layer_decay_num_layers=4,
        ),
        schedule=dict(power=1.0, min_lr=0.0, warmup_steps=3, warmup_ratio=1e-6),
        total_steps=10,
    )


@pytest.fixture(scope="module")
def official_names(official_family):
    """{backbone: {official param name: shape}} of the small RankSeg UperNets (no buffers)."""
    out = {}
    for backbone in ("swin", "beit"):
        sd = state_dict_from_checkpoint(
            load_pth(official_family / f"{backbone}_upernet_rankseg.pth")
        )
        out[backbone] = {k: np.shape(v) for k, v in sd.items() if not k.endswith(BUFFERS)}
    return out


def shapes_of(backbone):
    model = small_upernet(backbone, "rankseg")
    x = np.zeros((1, 48, 48, 3), np.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def by_name(tree):
    """A params-shaped tree of floats → {official name: float}."""
    flat = variables_to_state_dict({"params": tree})
    return {k: np.asarray(v).item() for k, v in flat.items() if not k.endswith(BUFFERS)}


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def test_swin_groups_are_mmcv_custom_keys(official_names):
    """lr multiplier and weight decay of every parameter of the small Swin UperNet + RankSeg
    equal mmcv's custom-keys assignment with the fb7a30f Swin row's keys."""
    config = swin_config()
    groups = optim.param_groups(shapes_of("swin"), config)
    lr, wd = by_name(groups["lr_mult"]), by_name(groups["weight_decay"])
    names = official_names["swin"]
    assert set(lr) == set(names)
    custom = {k: dict(decay_mult=m) for k, m in SWIN_DECAY_MULT}
    custom.update({k: dict(lr_mult=m) for k, m in SWIN_LR_MULT})
    for name in names:
        want_lr, want_wd = mmcv_custom_keys_group(name, 1.0, 0.01, custom)
        assert (lr[name], wd[name]) == pytest.approx((want_lr, want_wd), rel=1e-12), name
    # The rules separate: no-decay tables and norms, the image head at lr × 0.1 whose norms
    # DO decay (the longer `block.` key wins and has no decay_mult), the rest at the base.
    table = "backbone.stages.0.blocks.1.attn.w_msa.relative_position_bias_table"
    assert (lr[table], wd[table]) == (1.0, 0.0)
    assert (lr["backbone.norm3.weight"], wd["backbone.norm3.weight"]) == (1.0, 0.0)
    head_norm = "decode_head.img_cls_head.block.norm1.weight"
    assert (lr[head_norm], wd[head_norm]) == pytest.approx((0.1, 0.01))
    assert (lr["decode_head.img_cls_head.fc.W"], wd["decode_head.img_cls_head.fc.W"]) == (
        pytest.approx((0.1, 0.01))
    )
    proj = "decode_head.img_cls_head.proj_dec.depthwise_conv.conv.weight"
    assert proj in lr and (lr[proj], wd[proj]) == pytest.approx((1.0, 0.01))
    assert (lr["decode_head.norm.weight"], wd["decode_head.norm.weight"]) == (1.0, 0.0)
    counts = {}
    for name in names:
        counts[(lr[name], wd[name])] = counts.get((lr[name], wd[name]), 0) + 1
    # (1, wd), (1, 0) and (0.1, wd): no image-head parameter escapes its lr key's full decay.
    assert set(counts) == {(1.0, 0.01), (1.0, 0.0), (0.1, 0.01)}


def test_beit_groups_are_unilm_layer_decay(official_names):
    """Every parameter of the small BEiT UperNet + RankSeg: the official constructor's lr and
    weight decay; its custom keys (image head lr × 0.1) play no part, as in the fork."""
    config = beit_config()
    groups = optim.param_groups(shapes_of("beit"), config)
    lr, wd = by_name(groups["lr_mult"]), by_name(groups["weight_decay"])
    names = official_names["beit"]
    assert set(lr) == set(names)
    for name, shape in names.items():
        want = unilm_layer_decay_group(name, shape, 1.0, 0.05, 4, 0.95)
        assert (lr[name], wd[name]) == pytest.approx(want, rel=1e-12), name
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(0.95**5)
    assert lr["backbone.blocks.3.attn.relative_position_bias_table"] == pytest.approx(0.95)
    assert wd["backbone.blocks.3.attn.relative_position_bias_table"] == 0.05  # 2-D: decays
    assert lr["decode_head.img_cls_head.fc.W"] == 1.0
    assert len({round(v, 12) for v in lr.values()}) == 6  # layers 0..5


def test_group_learning_rates_follow_the_mmcv_hook(official_names):
    """The lr of every leaf at warm-up and decay steps = mmcv's hook on the group's initial lr
    (BEiT: layer decay; Swin: lr_mult, also with a min_lr > 0, where mmcv's group rate is not
    m × the base rate)."""
    beit = beit_config()
    shapes = shapes_of("beit")
    names = official_names["beit"]
    for t in (0, 1, 2, 3, 7, 10):
        got = by_name(optim.group_learning_rates(shapes, beit, t))
        for name, shape in names.items():
            initial, _ = unilm_layer_decay_group(name, shape, 2e-5, 0.05, 4, 0.95)
            want = mmcv_lr(initial, t, 10, 1.0, 0.0, 3, 1e-6)
            assert got[name] == pytest.approx(want, rel=1e-6, abs=1e-15), (t, name)
    first = by_name(optim.group_learning_rates(shapes, beit, 0))
    assert first["decode_head.cls_emb"] == pytest.approx(2e-5 * 1e-6)  # warm-up starts at 1e-6

    swin = swin_config(min_lr=1e-4, power=0.9)  # the fork's Swin config read literally
    shapes = shapes_of("swin")
    custom = {k: dict(lr_mult=m) for k, m in SWIN_LR_MULT}
    for t in (0, 2, 5, 9):
        got = by_name(optim.group_learning_rates(shapes, swin, t))
        for name in official_names["swin"]:
            initial, _ = mmcv_custom_keys_group(name, 6e-5, 0.0, custom)
            want = mmcv_lr(initial, t, 10, 0.9, 1e-4, 3, 1e-6)
            assert got[name] == pytest.approx(want, rel=1e-6), (t, name)


# --------------------------------------------------------------------------------------------
# Steps against torch
# --------------------------------------------------------------------------------------------


def _random(shapes, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@pytest.mark.parametrize("backbone", ["swin", "beit"])
def test_adamw_steps_match_torch_groups(torch, official_names, backbone):
    """Four AdamW updates through warm-up (3 steps, ratio 1e-6) into the poly decay equal
    torch.optim.AdamW with one group per parameter at the official (lr, wd), the lr set by
    mmcv's hook before each step."""
    config = swin_config() if backbone == "swin" else beit_config()
    names = official_names[backbone]
    shapes = shapes_of(backbone)
    params = _random(shapes, 0)
    grads = [_random(shapes, 1 + i, 0.5) for i in range(4)]
    tx = optim.make_optimizer(config)
    state, update = tx.init(params), jax.jit(tx.update)
    # The updates are summed in float64: moves of ~1e-4 on float32 params of ~1 would lose
    # their last digits to the params' rounding, not to the optimiser.
    ours = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    for g in grads:
        current = jax.tree.map(lambda p: p.astype(np.float32), ours)
        updates, state = update(g, state, current)
        ours = jax.tree.map(lambda p, u: p + np.asarray(u, np.float64), ours, updates)

    if backbone == "swin":
        custom = {k: dict(decay_mult=m) for k, m in SWIN_DECAY_MULT}
        custom.update({k: dict(lr_mult=m) for k, m in SWIN_LR_MULT})
        group = {n: mmcv_custom_keys_group(n, 6e-5, 0.01, custom) for n in names}
    else:
        group = {n: unilm_layer_decay_group(n, s, 2e-5, 0.05, 4, 0.95) for n, s in names.items()}
    start = variables_to_state_dict({"params": params})
    tensors = {n: torch.tensor(np.asarray(start[n], np.float64), requires_grad=True) for n in names}
    opt = torch.optim.AdamW(
        [dict(params=[tensors[n]], lr=group[n][0], weight_decay=group[n][1]) for n in names],
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    for t, g in enumerate(grads):
        sd = variables_to_state_dict({"params": g})
        for n in names:
            tensors[n].grad = torch.tensor(np.asarray(sd[n], np.float64))
        for pg, n in zip(opt.param_groups, names, strict=True):
            pg["lr"] = mmcv_lr(group[n][0], t, 10, 1.0, 0.0, 3, 1e-6)
        opt.step()
    ours_sd = variables_to_state_dict({"params": ours})
    for n in names:
        theirs = tensors[n].detach().numpy() - np.asarray(start[n], np.float64)
        mine = ours_sd[n] - np.asarray(start[n], np.float64)
        err = np.abs(mine - theirs).max()
        assert err <= 2e-5 * np.abs(theirs).max(), f"{n}: {err:.3g} of {np.abs(theirs).max():.3g}"


def test_accumulated_updates_take_the_lr_of_the_iteration_that_applies_them():
    """BEiT recipe: update_interval 2 under mmcv's runner; the u-th update steps the optimiser
    at iteration 2u + 1 of max_iters (320k, warm-up 3000), with that iteration's lr. Plain SGD
    without momentum on a constant gradient makes each applied update −lr(t)·g exactly."""
    config = recipe_config(
        optimizer=dict(name="sgd", lr=0.5, momentum=0.0, decay_mult=(), grad_accum_steps=2),
        schedule=dict(power=1.0, min_lr=0.0, warmup_steps=6, warmup_ratio=1e-6),
        total_steps=20,
    )
    params = {"w": np.ones((3,), np.float32)}
    grad = {"w": np.full((3,), 2.0, np.float32)}
    tx = optim.make_optimizer(config)
    state, update = tx.init(params), jax.jit(tx.update)
    applied = []
    for _ in range(20):  # 20 iterations = 10 updates
        updates, state = update(grad, state, params)
        applied.append(float(updates["w"][0]))
    assert applied[0::2] == [0.0] * 10  # the first micro-batch of each pair only accumulates
    for u, value in enumerate(applied[1::2]):
        want = -2.0 * mmcv_lr(0.5, 2 * u + 1, 20, 1.0, 0.0, 6, 1e-6)
        assert value == pytest.approx(want, rel=1e-6, abs=1e-12), u
    assert float(optim.make_schedule(config)(19)) == pytest.approx(0.5 * (1 - 19 / 20), rel=1e-6)


# --------------------------------------------------------------------------------------------
# Config errors
# --------------------------------------------------------------------------------------------


def test_optimizer_config_errors_name_the_key():
    config = beit_config()
    with config.unlocked():
        config.optimizer.lr_mult = SWIN_LR_MULT
    with pytest.raises(ConfigError, match="optimizer.decay_mult / optimizer.lr_mult"):
        optim.make_optimizer(config)
    config = beit_config()
    with config.unlocked():
        config.optimizer.layer_decay_num_layers = 0
    with pytest.raises(ConfigError, match="layer_decay_num_layers"):
        optim.make_optimizer(config)
    config = swin_config()
    with config.unlocked():
        config.optimizer.constructor = "lamb_groups"
    with pytest.raises(ConfigError, match="optimizer.constructor='lamb_groups'"):
        optim.make_optimizer(config)
    config = swin_config()
    with config.unlocked():
        config.optimizer.betas = (0.9, 1.5)
    with pytest.raises(ConfigError, match="optimizer.betas"):
        optim.make_optimizer(config)
    config = swin_config(warmup_ratio=2.0)
    with pytest.raises(ConfigError, match="schedule.warmup_ratio"):
        optim.make_optimizer(config)
