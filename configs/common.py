"""The one config schema every rankseg_jax config fills in, and the arg grammar of the configs.

Every config file returns `with_defaults(overrides)`: the full key tree below with the file's
values on top. Keys outside the tree are rejected with a message naming them, so a typo in a
config file or in `--config.x.y=...` never silently does nothing.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# Encoder widths per ViT variant: (width, depth, heads, mlp_dim).
VIT_VARIANTS = {
    "Ti/16": (192, 12, 3, 768),
    "S/16": (384, 12, 6, 1536),
    "B/16": (768, 12, 12, 3072),
    "L/16": (1024, 24, 16, 4096),
}
HEADS = ("rankseg", "mask", "gt")
MODES = ("train", "eval", "predict", "export")

# Dataset facts (classes, normalisation, ignore value, label reduction, default root).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
DATASETS = {
    "ade20k": dict(
        n_cls=150,
        root="data/ade/ADEChallengeData2016",
        train_split="training",
        val_split="validation",
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
        ignore_index=255,
        reduce_zero_label=True,
    ),
    "coco_stuff10k": dict(
        n_cls=171,
        root="data/coco_stuff10k",
        train_split="train",
        val_split="test",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_index=255,
        reduce_zero_label=True,
    ),
    "coco_stuff164k": dict(
        n_cls=171,
        root="data/coco_stuff164k",
        train_split="train2017",
        val_split="val2017",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_index=255,
        reduce_zero_label=False,
    ),
    "pascal_context": dict(
        n_cls=60,
        root="data/VOCdevkit/VOC2010",
        train_split="train",
        val_split="val",
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
        ignore_index=255,
        reduce_zero_label=False,
    ),
    "ade20k_full": dict(
        n_cls=847,
        root="data/ADE20K_2021_17_01",
        train_split="training",
        val_split="validation",
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
        ignore_index=65535,
        reduce_zero_label=False,
    ),
    "synthetic_ade20k": dict(
        n_cls=150,
        root="data/synthetic_ade/ADEChallengeData2016",
        train_split="training",
        val_split="validation",
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
        ignore_index=255,
        reduce_zero_label=True,
    ),
}


def schema() -> dict[str, Any]:
    """The full key tree with its defaults (the reference ADE20K ViT-B/16 RankSeg recipe)."""
    ade = DATASETS["ade20k"]
    return dict(
        seed=0,
        batch_size=8,
        total_steps=160_000,
        init_from="",
        mode="train",
        model=dict(
            variant="B/16",
            head="rankseg",
            n_cls=150,
            k=50,
            img_size=(512, 512),
            patch_size=16,
            # Explicit sizes; 0 means "from the variant" (decoder: width = encoder width,
            # heads = width / 64, mlp = 4 * width).
            width=0,
            depth=0,
            num_heads=0,
            mlp_dim=0,
            dec_width=0,
            dec_layers=3,
            dec_heads=0,
            dec_mlp_dim=0,
            downsample=8,
            dropout=0.1,
            drop_path_rate=0.1,
            dec_drop_path_rate=0.0,
            oce=False,
            oce_start_layer=-1,
            compute_dtype="float32",
            attention_impl="auto",
            remat="none",
            pretrained="",
        ),
        data=dict(
            dataset="ade20k",
            root=ade["root"],
            train_split=ade["train_split"],
            val_split=ade["val_split"],
            mean=ade["mean"],
            std=ade["std"],
            ignore_index=ade["ignore_index"],
            reduce_zero_label=ade["reduce_zero_label"],
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
        ),
        optimizer=dict(
            name="sgd",
            lr=1e-3,
            momentum=0.9,
            weight_decay=0.0,
            # (substring, multiplier) pairs; the longest matching key wins (mmcv semantics).
            decay_mult=(("pos_embed", 0.0), ("cls_token", 0.0), ("norm", 0.0)),
            grad_clip_norm=0.0,
            grad_accum_steps=1,
        ),
        schedule=dict(name="poly", power=0.9, min_lr=1e-5, warmup_steps=0),
        loss=dict(
            img_loss="asl",
            img_loss_weight=10.0,
            gamma_neg=2.0,
            gamma_pos=0.0,
            clip=0.05,
            eps=1e-5,
            seg_loss_weight=1.0,
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
        ),
        predict=dict(input="", output="", figures=True, submission_format=False),
        export=dict(output="", formats=("pth", "safetensors"), segmenter_layout=False),
        mesh=dict(data=-1, fsdp=1, fsdp_min_size_mb=4.0, print_sharding=False),
        checkpoint=dict(every_steps=16_000, keep_latest=2, keep_best=1, async_save=True),
        logging=dict(every_steps=50, profile_steps=(), resume_mismatch_ok=False),
    )


class ConfigError(ValueError):
    """A config value or key that cannot work; the message names the key."""


def _check_keys(value: Any, spec: Any, path: str) -> None:
    if not isinstance(spec, dict):
        return
    present = set(value.keys())
    unknown = sorted(present - set(spec))
    if unknown:
        where = path or "config"
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")
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
    tree = _deep_update(schema(), overrides or {})
    config = ml_collections.ConfigDict(tree)
    config.lock()
    return config


def dataset_overrides(name: str) -> dict[str, Any]:
    """The `data` keys that follow from a dataset name (root, splits, mean/std, ignore)."""
    if name not in DATASETS:
        raise ConfigError(f"unknown data.dataset {name!r}; known: {', '.join(DATASETS)}")
    facts = dict(DATASETS[name])
    facts.pop("n_cls")
    return dict(dataset=name, **facts)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parse a comma-separated config arg such as "variant=L/16,head=mask,runlocal".

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


def vit_dims(model: ml_collections.ConfigDict) -> dict[str, int]:
    """Resolved encoder and decoder sizes of a model config (explicit values win)."""
    if model.variant not in VIT_VARIANTS and not (model.width and model.depth):
        raise ConfigError(
            f"model.variant {model.variant!r} is not one of {', '.join(VIT_VARIANTS)}; "
            "set model.width/depth/num_heads/mlp_dim for a custom size"
        )
    width, depth, heads, mlp = VIT_VARIANTS.get(model.variant, (0, 0, 0, 0))
    width = model.width or width
    dec_width = model.dec_width or width
    return dict(
        width=width,
        depth=model.depth or depth,
        num_heads=model.num_heads or heads or width // 64,
        mlp_dim=model.mlp_dim or mlp or 4 * width,
        dec_width=dec_width,
        dec_layers=model.dec_layers,
        dec_heads=model.dec_heads or max(dec_width // 64, 1),
        dec_mlp_dim=model.dec_mlp_dim or 4 * dec_width,
    )


# The RankSeg ADE/Pascal recipes multiply weight decay by 100 on the image-level block and ml_fc.
RANKSEG_DECAY_MULT = (
    ("pos_embed", 0.0),
    ("cls_token", 0.0),
    ("norm", 0.0),
    ("decode_head.blocks.0.", 100.0),
    ("decode_head.ml_fc", 100.0),
)


def segmenter_config(
    dataset: str,
    *,
    variant: str,
    head: str,
    oce: bool,
    runlocal: bool,
    iters: int,
    crop: int,
    img_size: int,
    img_scale: tuple[int, int],
    k: int,
    img_loss: str = "asl",
    img_loss_weight: float = 10.0,
    weight_decay: float = 0.0,
    rankseg_decay_mult: bool = False,
    eval_scales: tuple[float, ...] = (1.0,),
    eval_flip: bool = False,
) -> ml_collections.ConfigDict:
    """One Segmenter row of the RankSeg paper as a full config (reference hyper-parameters)."""
    if head not in HEADS:
        raise ConfigError(f"head={head!r} is not one of {', '.join(HEADS)}")
    if variant not in ("B/16", "L/16"):
        raise ConfigError(f"variant={variant!r}: the Segmenter rows use B/16 or L/16")
    if head == "gt" and oce:
        raise ConfigError("head=gt with oce: the GT oracle uses its own class embeddings")
    n_cls = DATASETS[dataset]["n_cls"]
    data = dataset_overrides(dataset)
    data.update(crop_size=(crop, crop), img_scale=img_scale, test_scale=img_scale)
    model = dict(
        variant=variant,
        head=head,
        n_cls=n_cls,
        k={"rankseg": k, "mask": n_cls, "gt": n_cls}[head],
        img_size=(img_size, img_size),
        dec_layers=3 if head == "rankseg" else 2,
        oce=oce,
        oce_start_layer=VIT_VARIANTS[variant][1] - 1 if oce else -1,
    )
    decay = RANKSEG_DECAY_MULT if rankseg_decay_mult else schema()["optimizer"]["decay_mult"]
    overrides = dict(
        total_steps=iters,
        model=model,
        data=data,
        optimizer=dict(weight_decay=weight_decay, decay_mult=decay),
        loss=dict(img_loss=img_loss, img_loss_weight=img_loss_weight),
        eval=dict(
            crop=(crop, crop),
            stride=(crop, crop),
            scales=eval_scales,
            flip=eval_flip,
            every_steps=iters // 10,
        ),
        checkpoint=dict(every_steps=iters // 10),
    )
    if runlocal:
        _apply_runlocal(overrides)
    return with_defaults(overrides)


def _apply_runlocal(overrides: dict) -> None:
    """Shrink a config to a smoke run: tiny ViT, 64 px crops, a few steps on generated data."""
    model = overrides["model"]
    model.update(
        variant="custom",
        width=64,
        depth=2,
        num_heads=2,
        mlp_dim=256,
        dec_heads=2,
        img_size=(64, 64),
    )
    if model["oce"]:
        model["oce_start_layer"] = 1
    model["k"] = min(model["k"], 8) if model["head"] == "rankseg" else model["k"]
    overrides["data"].update(
        crop_size=(64, 64), img_scale=(256, 64), test_scale=(256, 64), num_workers=0
    )
    overrides.update(batch_size=2, total_steps=10)
    overrides["eval"].update(crop=(64, 64), stride=(48, 48), every_steps=5, max_images=4)
    overrides["checkpoint"].update(every_steps=5)
    overrides["logging"] = dict(every_steps=1)


def _multiple_of(value: Any, base: int, key: str) -> None:
    for v in tuple(value):
        if v <= 0 or v % base:
            raise ConfigError(f"{key}={tuple(value)} must be positive multiples of {base}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Reject configs that cannot work, before anything compiles (one message per problem)."""
    check_keys(config)
    m, d = config.model, config.data
    if m.head not in HEADS:
        raise ConfigError(f"model.head={m.head!r} is not one of {', '.join(HEADS)}")
    if config.mode not in MODES:
        raise ConfigError(f"mode={config.mode!r} is not one of {', '.join(MODES)}")
    vit_dims(m)
    _multiple_of(m.img_size, m.patch_size, "model.img_size")
    _multiple_of(d.crop_size, m.patch_size, "data.crop_size")
    if not 1 <= m.k <= m.n_cls:
        raise ConfigError(f"model.k={m.k} must be in 1..model.n_cls={m.n_cls}")
    if m.head == "gt" and m.oce:
        raise ConfigError("model.head='gt' cannot be combined with model.oce")
    if 0 <= d.ignore_index < m.n_cls:
        raise ConfigError(
            f"data.ignore_index={d.ignore_index} is a class id (model.n_cls={m.n_cls})"
        )
    if any(s > c for s, c in zip(config.eval.stride, config.eval.crop, strict=True)):
        raise ConfigError(f"eval.stride={config.eval.stride} exceeds eval.crop={config.eval.crop}")
    if m.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.compute_dtype={m.compute_dtype!r}: float32 or bfloat16")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size={config.batch_size} must be at least 1")
    if d.device_prefetch < 0:
        raise ConfigError(f"data.device_prefetch={d.device_prefetch} must be 0 or more")
