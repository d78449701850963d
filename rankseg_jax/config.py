"""The one config contract: schema, validation, the recipe-arg grammar, loading recipe files.

A recipe file (configs/*.py, not a package: loaded by path) defines `get_config(arg)` and
returns `with_defaults(overrides)`: the full key tree below with its values on top. Keys outside
the tree are rejected with a message naming them, so a typo in a recipe or in
`--config.x.y=...` never silently does nothing. The `model` part of the tree is the model
registry's components' CONFIG keys (rankseg_jax.models.registry); the `data` defaults are the
ADE20K reader's facts (rankseg_jax.data.readers). `validate` rejects configs that cannot work
before anything compiles; every problem is one `ConfigError` line naming the key.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
from typing import Any

import ml_collections

from rankseg_jax import optim
from rankseg_jax.data import readers
from rankseg_jax.errors import ConfigError
from rankseg_jax.models import registry, segmenter

MODES = ("train", "eval", "predict", "export")
REPO = pathlib.Path(__file__).resolve().parents[1]


def schema() -> dict[str, Any]:
    """The full key tree with its defaults (the reference ADE20K ViT-B/16 RankSeg recipe)."""
    data = readers.dataset_facts("ade20k")
    del data["n_cls"]
    return dict(
        seed=0,
        batch_size=8,
        total_steps=160_000,
        init_from="",
        mode="train",
        model=dict(
            encoder="vit",
            decode_head="mask_transformer",
            classifier="rankseg",  # full | rankseg | gt
            n_cls=150,
            k=50,
            img_size=(512, 512),
            compute_dtype="float32",
            attention_impl="auto",
            pretrained="",
            **registry.config_defaults(),
        ),
        data=dict(
            **data,
            crop_size=(512, 512),
            img_scale=(2048, 512),
            ratio_range=(0.5, 2.0),
            cat_max_ratio=0.75,
            flip_prob=0.5,
            photometric=True,
            test_scale=(2048, 512),
            source="directory",
            tfds_data_dir="",
            num_workers=4,
            prefetch=2,  # host batches buffered per grain worker
            device_prefetch=2,  # batches already sent to the devices beyond the current one
            skip_corrupt=False,
            generate_if_missing=False,
            synthetic_train=0,
            synthetic_val=0,
            synthetic_seed=0,
            synthetic_val_seed=1,
            # data.dataset='folder' (your own data, rankseg_jax/data/folder.py): class names and
            # palette ((r, g, b) per class) instead of <root>/classes.txt|json, the colour of
            # ignored pixels in RGB masks, and split list files (relative to data.root) that
            # replace the train / val split folders. Empty = unset.
            classes=(),
            palette=(),
            ignore_color=(),
            train_split_list="",
            val_split_list="",
        ),
        optimizer=dict(
            name="sgd",
            lr=1e-3,
            momentum=0.9,
            betas=(0.9, 0.999),  # adamw
            weight_decay=0.0,
            # mmcv custom keys, (substring, multiplier) pairs; decay_mult and lr_mult form one
            # dict and the longest matching key decides both (optim.py's docstring).
            decay_mult=(("pos_embed", 0.0), ("cls_token", 0.0), ("norm", 0.0)),
            lr_mult=(),
            # "default" (mmcv custom keys) | "layer_decay" (unilm's BEiT constructor: lr ×
            # layer_decay_rate^(num_layers + 1 − layer id); custom keys must be empty).
            constructor="default",
            layer_decay_rate=1.0,
            layer_decay_num_layers=0,
            grad_clip_norm=0.0,
            grad_accum_steps=1,
        ),
        # max_train_seconds: a wall-clock budget for the training loop (0 = off): training stops
        # at the first step that ends past it (checkpointed and evaluated there, like the last
        # step); the learning-rate schedule still follows total_steps.
        schedule=dict(
            name="poly",
            power=0.9,
            min_lr=1e-5,
            warmup_steps=0,
            warmup_ratio=0.1,  # mmcv's linear warm-up starts at warmup_ratio × the group's lr
            max_train_seconds=0.0,
        ),
        loss=dict(
            img_loss="asl",
            img_loss_weight=10.0,
            gamma_neg=2.0,
            gamma_pos=0.0,
            clip=0.05,
            eps=1e-5,
            seg_loss_weight=1.0,
            # Class weights in every head's pixel CE (RankSeg's slot CE: each slot weighs its
            # class): "" = none, "inverse_frequency" (from the train labels, cached beside the
            # dataset), or one weight per class (a tuple in a recipe, "w0,w1,..." on the
            # command line). The weighted CE is torch's F.cross_entropy(weight=...) mean.
            class_weight="",
            dice_weight=0.0,  # > 0 adds mmseg's DiceLoss (loss_weight = dice_weight)
            aux_weight=0.4,  # auxiliary head CE (conv families; mmseg's FCNHead loss_weight)
        ),
        eval=dict(
            mode="slide",
            crop=(512, 512),
            stride=(512, 512),
            scales=(1.0,),
            flip=False,
            every_steps=16_000,
            window_batch=8,
            max_images=0,
            # Output tiles (rows, cols) of the on-device resize back to each image's size: they
            # bound memory (tile × n_cls floats); smaller tiles suit small images.
            tile=(256, 1024),
            fscore_beta=1.0,  # the β of mFscore (mmseg eval_metrics)
        ),
        predict=dict(input="", output="", figures=True, submission_format=False),
        export=dict(output="", formats=("pth", "safetensors"), segmenter_layout=False),
        mesh=dict(data=-1, fsdp=1, fsdp_min_size_mb=4.0, print_sharding=False),
        checkpoint=dict(every_steps=16_000, keep_latest=2, keep_best=1, async_save=True),
        logging=dict(every_steps=50, profile_steps=(), resume_mismatch_ok=False),
    )


def _check_keys(value: Any, spec: Any, path: str) -> None:
    if not isinstance(spec, dict):
        return
    present = set(value.keys())
    unknown = sorted(present - set(spec))
    if unknown:
        raise ConfigError(f"unknown key(s) in {path or 'config'}: {', '.join(unknown)}")
    for key, sub in spec.items():
        if key not in present:
            raise ConfigError(f"missing key {path + '.' if path else ''}{key}")
        _check_keys(value[key], sub, f"{path}.{key}" if path else key)


def check_keys(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError if `config` has keys outside the schema or lacks schema keys."""
    _check_keys(config, schema(), "")


def _deep_update(base: dict, overrides: dict, path: str = "") -> dict:
    for key, value in overrides.items():
        where = f"{path}.{key}" if path else key
        if key not in base:
            raise ConfigError(f"unknown config key {where}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where} must be a dict")
            _deep_update(base[key], value, where)
        else:
            base[key] = value
    return base


def with_defaults(overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The schema's defaults with `overrides` (a nested dict) on top; unknown keys raise."""
    config = ml_collections.ConfigDict(_deep_update(schema(), overrides or {}))
    config.lock()
    return config


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse a recipe's comma-separated arg such as "variant=L/16,head=mask,runlocal".

    Types follow the defaults; a bare name sets a boolean default to True. Unknown names raise.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ConfigError(f"unknown config arg {name!r}; known: {', '.join(defaults)}")
        kind = type(defaults[name])
        if kind is bool:
            if sep and raw.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config arg {name} takes true/false, got {raw!r}")
            values[name] = (not sep) or raw.lower() in ("true", "1")
        else:
            if not sep:
                raise ConfigError(f"config arg {name} needs a value ({name}=...)")
            values[name] = kind(raw)
    return ml_collections.ConfigDict(values)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load "path/to/recipe.py[:arg]" (relative to the working directory or the repo root)."""
    path_str, _, arg = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.exists() and (REPO / path).exists():
        path = REPO / path
    if not path.is_file():
        raise ConfigError(f"config file {path_str} not found")
    module_spec = importlib.util.spec_from_file_location(f"_rankseg_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def resolve(config: ml_collections.ConfigDict | str) -> ml_collections.ConfigDict:
    """A validated config from a ConfigDict or a `--config` string."""
    if isinstance(config, str):
        config = load_config(config)
    validate(config)
    return config


def _multiple_of(value: Any, base: int, key: str) -> None:
    for v in tuple(value):
        if v <= 0 or v % base:
            raise ConfigError(f"{key}={tuple(value)} must be positive multiples of {base}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject configs that cannot work, before anything compiles (one message per problem)."""
    check_keys(config)
    m, d = config.model, config.data
    if config.mode not in MODES:
        raise ConfigError(f"mode={config.mode!r} is not one of {', '.join(MODES)}")
    segmenter.check_config(m)
    _multiple_of(d.crop_size, registry.ENCODERS[m.encoder].size_multiple(m), "data.crop_size")
    if d.dataset not in readers.READERS:
        known = ", ".join(readers.READERS)
        raise ConfigError(f"unknown data.dataset {d.dataset!r}; known: {known}")
    if d.dataset == "folder":  # the class count is the dataset instance's, not the reader's
        reader_n_cls = len(readers.dataset_labels(d)[0])
    else:
        reader_n_cls = readers.READERS[d.dataset].n_cls
    if reader_n_cls != m.n_cls:
        raise ConfigError(
            f"model.n_cls={m.n_cls} but data.dataset={d.dataset!r} has {reader_n_cls} classes"
        )
    if 0 <= d.ignore_index < m.n_cls:
        raise ConfigError(
            f"data.ignore_index={d.ignore_index} is a class id (model.n_cls={m.n_cls})"
        )
    if any(s > c for s, c in zip(config.eval.stride, config.eval.crop, strict=True)):
        raise ConfigError(f"eval.stride={config.eval.stride} exceeds eval.crop={config.eval.crop}")
    optim.check_optimizer_config(config)
    if config.batch_size < 1:
        raise ConfigError(f"batch_size={config.batch_size} must be at least 1")
    if not config.schedule.max_train_seconds >= 0:  # also rejects NaN
        raise ConfigError(
            f"schedule.max_train_seconds={config.schedule.max_train_seconds} must be 0 (no "
            "budget) or a positive number of seconds"
        )
    class_weight_setting(config)
    if not config.loss.dice_weight >= 0:
        raise ConfigError(f"loss.dice_weight={config.loss.dice_weight} must be 0 (off) or more")
    if not config.eval.fscore_beta > 0:
        raise ConfigError(f"eval.fscore_beta={config.eval.fscore_beta} must be positive")
    if d.device_prefetch < 0:
        raise ConfigError(f"data.device_prefetch={d.device_prefetch} must be 0 or more")


INVERSE_FREQUENCY = "inverse_frequency"


def class_weight_setting(config: ml_collections.ConfigDict) -> str | tuple[float, ...] | None:
    """`loss.class_weight` parsed: None (unweighted), "inverse_frequency", or n_cls weights.

    Accepts a sequence of numbers or a string ("", "inverse_frequency", "w0,w1,..."); raises
    ConfigError naming the key for anything else, a wrong count or a negative weight.
    """
    value, n_cls = config.loss.class_weight, int(config.model.n_cls)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        if value.strip() == INVERSE_FREQUENCY:
            return INVERSE_FREQUENCY
        parts = [p for p in value.replace("(", "").replace(")", "").split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        weights = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(
            f"loss.class_weight={value!r}: expected '', '{INVERSE_FREQUENCY}' or {n_cls} "
            "numbers (one per class)"
        ) from None
    if len(weights) != n_cls:
        raise ConfigError(
            f"loss.class_weight has {len(weights)} weights for model.n_cls={n_cls} classes"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise ConfigError(
            f"loss.class_weight={weights}: weights must be finite, ≥ 0, and not all 0"
        )
    return weights
