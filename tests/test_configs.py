# ruff: noqa: E501  (the reference table keeps one row per line)
"""Every Segmenter row of the RankSeg paper against the reference's values (spec 5 and 7)."""

from __future__ import annotations

import pytest

from configs import ade20k_full, ade20k_segmenter, coco_stuff10k, demo, pascal_context
from rankseg_jax import config as common
from rankseg_jax import inference, recipes
from rankseg_jax.errors import ConfigError

RANKSEG_MULT = dict(recipes.RANKSEG_DECAY_MULT)
IMAGENET = ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
HALF = ((127.5,) * 3, (127.5,) * 3)

# (module, arg, dataset, n_cls, crop, img_size, iters, head, k, dec_layers, img_loss, weight,
#  wd, ×100 rules, mean/std, eval scales)
REFERENCE = [
    (ade20k_segmenter, "head=mask", "ade20k", 150, 512, 512, 160_000, "mask", 150, 2, None, None, 0.0, False, HALF, 1),
    (ade20k_segmenter, "", "ade20k", 150, 512, 512, 160_000, "rankseg", 50, 3, "asl", 10.0, 1e-6, True, HALF, 1),
    (ade20k_segmenter, "variant=L/16,head=mask", "ade20k", 150, 640, 640, 160_000, "mask", 150, 2, None, None, 0.0, False, HALF, 1),
    (ade20k_segmenter, "variant=L/16", "ade20k", 150, 640, 640, 160_000, "rankseg", 50, 3, "asl", 10.0, 1e-6, True, HALF, 1),
    (ade20k_segmenter, "head=mask,oce", "ade20k", 150, 512, 512, 160_000, "mask", 150, 2, None, None, 0.0, False, HALF, 1),
    (ade20k_segmenter, "oce", "ade20k", 150, 512, 512, 160_000, "rankseg", 50, 3, "asl", 10.0, 1e-6, True, HALF, 1),
    (ade20k_segmenter, "head=gt", "ade20k", 150, 512, 512, 160_000, "gt", 150, 2, None, None, 1e-6, True, HALF, 1),
    (coco_stuff10k, "head=mask", "coco_stuff10k", 171, 512, 512, 40_000, "mask", 171, 2, None, None, 0.0, False, IMAGENET, 1),
    (coco_stuff10k, "head=mask,iters=80000", "coco_stuff10k", 171, 512, 512, 80_000, "mask", 171, 2, None, None, 0.0, False, IMAGENET, 1),
    (coco_stuff10k, "", "coco_stuff10k", 171, 512, 512, 40_000, "rankseg", 50, 3, "bce", 10.0, 0.0, False, IMAGENET, 1),
    (coco_stuff10k, "iters=80000", "coco_stuff10k", 171, 512, 512, 80_000, "rankseg", 50, 3, "bce", 5.0, 0.0, False, IMAGENET, 1),
    (coco_stuff10k, "variant=L/16,head=mask", "coco_stuff10k", 171, 640, 640, 40_000, "mask", 171, 2, None, None, 0.0, False, IMAGENET, 1),
    (coco_stuff10k, "variant=L/16", "coco_stuff10k", 171, 640, 640, 40_000, "rankseg", 50, 3, "asl", 10.0, 0.0, False, IMAGENET, 1),
    (coco_stuff10k, "head=mask,oce", "coco_stuff10k", 171, 512, 512, 40_000, "mask", 171, 2, None, None, 0.0, False, IMAGENET, 1),
    (coco_stuff10k, "oce", "coco_stuff10k", 171, 512, 512, 40_000, "rankseg", 50, 3, "bce", 10.0, 0.0, False, IMAGENET, 1),
    (coco_stuff10k, "head=gt", "coco_stuff10k", 171, 512, 512, 40_000, "gt", 171, 2, None, None, 0.0, False, IMAGENET, 1),
    (pascal_context, "head=mask", "pascal_context", 60, 480, 512, 80_000, "mask", 60, 2, None, None, 0.0, False, HALF, 1),
    (pascal_context, "", "pascal_context", 60, 480, 512, 80_000, "rankseg", 25, 3, "asl", 5.0, 1e-6, True, HALF, 6),
    (pascal_context, "ss", "pascal_context", 60, 480, 512, 80_000, "rankseg", 25, 3, "asl", 5.0, 1e-6, True, HALF, 1),
    (pascal_context, "msflip", "pascal_context", 60, 480, 512, 80_000, "rankseg", 25, 3, "asl", 5.0, 1e-6, True, HALF, 6),
    (pascal_context, "head=gt", "pascal_context", 60, 480, 512, 80_000, "gt", 60, 2, None, None, 0.0, False, HALF, 1),
]  # fmt: skip


@pytest.mark.parametrize("row", REFERENCE, ids=lambda r: f"{r[0].__name__}:{r[1]}")
def test_reference_values(row):
    module, arg, dataset, n_cls, crop, img_size, iters, head, k, layers, loss, weight = row[:12]
    wd, x100, (mean, std), n_scales = row[12:]
    c = module.get_config(arg)
    common.validate(c)
    kind = recipes.classifier(head)
    assert (c.data.dataset, c.model.n_cls, c.model.classifier, c.model.k) == (
        dataset,
        n_cls,
        kind,
        k,
    )
    assert c.data.crop_size == (crop, crop) and c.model.img_size == (img_size, img_size)
    assert c.eval.crop == c.eval.stride == (crop, crop) and len(c.eval.scales) == n_scales
    assert c.total_steps == iters and c.batch_size == 8
    assert c.eval.every_steps == c.checkpoint.every_steps == iters // 10
    assert c.model.dec_layers == layers and c.model.dropout == 0.1
    assert c.model.drop_path_rate == 0.1 and c.model.downsample == 8
    if loss:
        assert (c.loss.img_loss, c.loss.img_loss_weight) == (loss, weight)
        assert (c.loss.gamma_neg, c.loss.gamma_pos, c.loss.clip, c.loss.eps) == (2, 0, 0.05, 1e-5)
    o = c.optimizer
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 1e-3, 0.9, wd)
    assert (dict(o.decay_mult) == RANKSEG_MULT) == x100
    assert (c.schedule.name, c.schedule.power, c.schedule.min_lr) == ("poly", 0.9, 1e-5)
    assert c.schedule.warmup_steps == 0
    assert (tuple(c.data.mean), tuple(c.data.std)) == (mean, std)
    scale = (4 * crop, crop) if dataset != "pascal_context" else (4160, 520)
    assert c.data.img_scale == c.data.test_scale == scale
    assert c.data.ratio_range == (0.5, 2.0) and c.data.cat_max_ratio == 0.75
    assert c.data.ignore_index == 255


def test_pascal_context_evaluates_as_each_official_row():
    """RankSeg row: pascal_context_meanstd0.5_test.py's ms+flip (ratios 0.5-1.75 x flip) for
    training-time and final eval alike; baseline/GT rows: single scale; `ss`/`msflip` switch."""
    ms = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    for arg, scales, flip in [
        ("", ms, True),
        ("runlocal", ms, True),
        ("ss", (1.0,), False),
        ("head=mask", (1.0,), False),
        ("head=gt", (1.0,), False),
        ("head=mask,msflip", ms, True),
    ]:
        c = pascal_context.get_config(arg)
        assert (tuple(c.eval.scales), bool(c.eval.flip)) == (scales, flip), arg
        _, kwargs = inference.settings_from_config(c)  # what training-time and final eval read
        assert (kwargs["ratios"], kwargs["flip"]) == (scales, flip), arg
        assert kwargs["test_scale"] == tuple(c.data.test_scale)
    with pytest.raises(ConfigError, match="not both"):
        pascal_context.get_config("ss,msflip")


def test_ade20k_full_is_ours_and_valid():
    c = ade20k_full.get_config("")
    common.validate(c)
    assert c.model.n_cls == 847 and c.data.ignore_index == 65535


@pytest.mark.parametrize(
    "module,arg,message",
    [
        (ade20k_segmenter, "head=gt,oce", "head=gt with oce"),
        (ade20k_segmenter, "variant=S/16", "variant='S/16'"),
        (ade20k_segmenter, "head=fcn", "head='fcn'"),
        (ade20k_segmenter, "bogus", "unknown config arg 'bogus'"),
        (coco_stuff10k, "iters=1000", "iters=1000"),
        (coco_stuff10k, "variant=L/16,iters=80000", "only a 40000-iteration row"),
        (ade20k_full, "head=gt", "no GT-oracle row"),
    ],
)
def test_invalid_combinations(module, arg, message):
    with pytest.raises(ConfigError, match=message):
        module.get_config(arg)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("data.crop_size", (500, 500), "data.crop_size=.* multiples of 16"),
        ("model.img_size", (520, 512), "model.img_size=.* multiples of 16"),
        ("model.k", 151, "model.k=151 must be in 1..model.n_cls=150"),
        ("eval.stride", (640, 640), "eval.stride=.* exceeds eval.crop"),
        ("data.ignore_index", 3, "data.ignore_index=3 is a class id"),
        ("model.compute_dtype", "float16", "model.compute_dtype"),
        ("batch_size", 0, "batch_size=0"),
    ],
)
def test_validation_errors(key, value, message):
    c = ade20k_segmenter.get_config("")
    with c.unlocked():
        section, _, name = key.rpartition(".")
        (c[section] if section else c)[name] = value
    with pytest.raises(ConfigError, match=message):
        common.validate(c)


def test_unknown_keys_rejected():
    with pytest.raises(ConfigError, match="unknown config key model.widht"):
        common.with_defaults({"model": {"widht": 3}})
    c = demo.get_config("")
    with pytest.raises(AttributeError):
        c.model.widht = 3  # locked: a typo in --config.model.widht fails too
    with c.unlocked():
        c.optimizer.extra = 1
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in optimizer: extra"):
        common.validate(c)


def test_runlocal_variants_build():
    for module in (ade20k_segmenter, coco_stuff10k, pascal_context, ade20k_full):
        c = module.get_config("runlocal")
        common.validate(c)
        assert c.model.img_size == (64, 64) and c.total_steps <= 10
