"""Helpers the recipe files (configs/*.py) share: the RankSeg paper's Segmenter rows.

Recipes call these and return a full config (rankseg_jax.config.with_defaults). Dataset facts
come from the readers (`data_overrides`), model sizes from the model modules; the runtime never
imports the recipes. The recipe arg `head=rankseg|mask|gt` names the paper's rows; it sets
`model.classifier` (mask → the "full" classifier of the baseline mask transformer).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from rankseg_jax.config import ConfigError, parse_arg, schema, with_defaults
from rankseg_jax.data import readers
from rankseg_jax.models.vit import VIT_VARIANTS

__all__ = ["ConfigError", "data_overrides", "parse_arg", "segmenter_config", "with_defaults"]

HEADS = {"rankseg": "rankseg", "mask": "full", "gt": "gt"}  # recipe arg → model.classifier

# The backbone every Segmenter row of the paper starts from (the official
# `_base_/models/segmenter_vit-*.py` `pretrained=` files), by rankseg_jax.weights name.
# `runlocal` smoke runs use "none" (random init: their tiny ViT has no published weights).
AUGREG_PRETRAINED = {"B/16": "augreg_vit_b16_384", "L/16": "augreg_vit_l16_384"}

# The RankSeg ADE/Pascal recipes multiply weight decay by 100 on the image-level block and ml_fc.
RANKSEG_DECAY_MULT = (
    ("pos_embed", 0.0),
    ("cls_token", 0.0),
    ("norm", 0.0),
    ("decode_head.blocks.0.", 100.0),
    ("decode_head.ml_fc", 100.0),
)


def data_overrides(dataset: str) -> dict[str, Any]:
    """The `data` keys that follow from a dataset name (root, splits, mean/std, labels)."""
    facts = readers.dataset_facts(dataset)
    del facts["n_cls"]
    return facts


def classifier(head: str) -> str:
    """The `model.classifier` of a recipe's head=... arg."""
    if head not in HEADS:
        raise ConfigError(f"head={head!r} is not one of {', '.join(HEADS)}")
    return HEADS[head]


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
    n_cls: int = 0,
) -> ml_collections.ConfigDict:
    """One Segmenter row of the RankSeg paper as a full config (reference hyper-parameters).

    n_cls: the class count when the dataset's is per instance (`folder`); 0 = the reader's.
    """
    kind = classifier(head)
    if variant not in ("B/16", "L/16"):
        raise ConfigError(f"variant={variant!r}: the Segmenter rows use B/16 or L/16")
    if head == "gt" and oce:
        raise ConfigError("head=gt with oce: the GT oracle uses its own class embeddings")
    n_cls = n_cls or readers.reader_class(dataset).n_cls
    data = data_overrides(dataset)
    data.update(crop_size=(crop, crop), img_scale=img_scale, test_scale=img_scale)
    model = dict(
        variant=variant,
        classifier=kind,
        n_cls=n_cls,
        k=k if kind == "rankseg" else n_cls,
        img_size=(img_size, img_size),
        dec_layers=3 if kind == "rankseg" else 2,
        oce=oce,
        oce_start_layer=VIT_VARIANTS[variant][1] - 1 if oce else -1,
        pretrained=AUGREG_PRETRAINED[variant],
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
    """Shrink a config to a smoke run: tiny ViT (random init), 64 px crops, a few steps."""
    model = overrides["model"]
    model.update(
        variant="custom",
        width=64,
        depth=2,
        num_heads=2,
        mlp_dim=256,
        dec_heads=2,
        img_size=(64, 64),
        pretrained="none",
    )
    if model["oce"]:
        model["oce_start_layer"] = 1
    model["k"] = min(model["k"], 8) if model["classifier"] == "rankseg" else model["k"]
    overrides["data"].update(
        crop_size=(64, 64), img_scale=(256, 64), test_scale=(256, 64), num_workers=0
    )
    overrides.update(batch_size=2, total_steps=10)
    overrides["eval"].update(crop=(64, 64), stride=(48, 48), every_steps=5, max_images=4)
    overrides["checkpoint"].update(every_steps=5)
    overrides["logging"] = dict(every_steps=1)
