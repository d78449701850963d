"""Flax params → the mmseg RankSeg `.pth`, `.safetensors` + JSON and the official Segmenter.

`python main.py --config=... --workdir=DIR --mode=export` takes the workdir's latest orbax
checkpoint (else `config.init_from`) and writes under `export.output` (default `DIR/export/`):

* `model.safetensors` + `model.json` (`export.formats` has 'safetensors'): the mmseg-named
  tensors and a description of the model (variant, sizes, n_cls, k, img_size, mean/std, class
  names, palette, head). Written first and without torch, so it exists even where torch is not.
* `model.pth` ('pth'): `{'meta': {CLASSES, PALETTE, provenance}, 'state_dict': OrderedDict}`,
  exactly the keys, shapes and order of the reference model's `state_dict()` in float32, so
  mmseg's `load_checkpoint` (and `load_state_dict(strict=True)`) take it. Needs torch.
* `segmenter/checkpoint.pth` + `segmenter/variant.yml` (`export.segmenter_layout`): the
  rstrudel/segmenter layout (`{'model': sd, 'n_cls': n}` with the unused 1000-way
  `encoder.head` as zeros) that `segm.model.factory.load_model` reads. Baseline heads only.

Every file is written atomically (temporary file + rename).
"""

from __future__ import annotations

import collections
import os
import pathlib
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import yaml
from jax.experimental import multihost_utils

import rankseg_jax
from rankseg_jax import recipes
from rankseg_jax.convert import mmseg, safetensors_io, segmenter_layout, torch_pickle
from rankseg_jax.data import readers
from rankseg_jax.errors import ConfigError
from rankseg_jax.models import registry, segmenter

__all__ = [
    "FORMATS",
    "ConfigError",
    "class_names_and_palette",
    "export_params",
    "mmseg_checkpoint",
    "model_description",
    "segmenter_checkpoint",
    "segmenter_variant",
    "state_dict_for_export",
]

FORMATS = ("pth", "safetensors")
# model.json's "head" keeps the recipe vocabulary (rankseg | mask | gt) of earlier exports.
_HEAD_NAMES = {classifier: head for head, classifier in recipes.HEADS.items()}
MMSEG_PTH = "model.pth"
SAFETENSORS = "model.safetensors"
SEGMENTER_DIR = "segmenter"

# rstrudel/segmenter backbone names (segm/config.yml) for our variants.
_SEGMENTER_BACKBONES = {
    "Ti/16": "vit_tiny_patch16_384",
    "S/16": "vit_small_patch16_384",
    "B/16": "vit_base_patch16_384",
    "L/16": "vit_large_patch16_384",
}


def host_params(params: Any) -> Any:
    """Params as host numpy arrays; arrays sharded over several processes are gathered first
    (a collective: every process must call this)."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, params)


def state_dict_for_export(
    params: Any, config: ml_collections.ConfigDict, model_state: Mapping[str, Any] | None = None
) -> collections.OrderedDict[str, np.ndarray]:
    """The mmseg state dict of `params`: float32, C-contiguous, in PyTorch `state_dict` order.

    The GT-oracle head names its selected-class LayerNorm `mask_norm.gamma` / `.beta`. Conv
    families (a registry `STATE_DICT` converter) also write `model_state`: BN `running_mean`,
    `running_var` and `num_batches_tracked` (0-d int64), as mmseg's SyncBN buffers.
    """
    converter = registry.state_dict_module(config.model)
    if converter is not None:
        variables = {"params": host_params(params), **host_params(dict(model_state or {}))}
        return collections.OrderedDict(converter.variables_to_state_dict(variables))
    return mmseg.params_to_state_dict(host_params(params), gt_head=config.model.classifier == "gt")


def class_names_and_palette(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], list]:
    """The dataset's class names and palette ((n_cls, 3) ints as nested lists), as mmseg's meta
    (readers.class_names_and_palette: the fallback for a custom n_cls is shared with predict)."""
    names, palette = readers.class_names_and_palette(config.data.dataset, config.model.n_cls)
    return names, [[int(c) for c in row] for row in palette]


def _model_sizes(config: ml_collections.ConfigDict) -> dict[str, Any]:
    m = config.model
    if registry.is_multi_level(m):  # conv families: the component config trees
        keys = [m.encoder, m.decode_head, "conv_head"]
        keys += ["rankseg_img_head"] if m.classifier == "rankseg" else []
        sizes = {key: m[key].to_dict() for key in keys if key in m}
        return dict(sizes, img_size=list(m.img_size))
    sizes = dict(segmenter.vit_dims(m))
    sizes.update(patch_size=m.patch_size, img_size=list(m.img_size))
    if m.classifier == "rankseg":
        sizes["downsample"] = m.downsample
    return sizes


def model_description(
    config: ml_collections.ConfigDict, source: str = "", step: int | None = None
) -> dict[str, Any]:
    """The JSON beside the `.safetensors`: enough to rebuild and use the model without a config."""
    m, d = config.model, config.data
    names, palette = class_names_and_palette(config)
    return dict(
        format="rankseg_jax export",
        layout="mmseg",
        variant=f"{m.encoder}+{m.decode_head}" if registry.is_multi_level(m) else m.variant,
        head=_HEAD_NAMES[m.classifier],
        oce=bool(m.oce),
        n_cls=m.n_cls,
        k=m.k,
        img_size=list(m.img_size),
        sizes=_model_sizes(config),
        dataset=d.dataset,
        mean=[float(v) for v in d.mean],
        std=[float(v) for v in d.std],
        reduce_zero_label=bool(d.reduce_zero_label),
        ignore_index=int(d.ignore_index),
        class_names=list(names),
        palette=palette,
        source=source,
        step=step,
        rankseg_jax_version=rankseg_jax.__version__,
    )


def mmseg_checkpoint(
    state_dict: Mapping[str, np.ndarray],
    config: ml_collections.ConfigDict,
    source: str = "",
    step: int | None = None,
) -> dict[str, Any]:
    """`{'meta', 'state_dict'}` as mmcv's `save_checkpoint` writes it (rankseg-spec.md 6.1).

    `meta` holds only plain python values (no numpy scalars), so `torch.load(weights_only=True)`
    and our torch-free reader both accept it. mmseg's test script reads CLASSES and PALETTE.
    """
    names, palette = class_names_and_palette(config)
    meta = dict(
        CLASSES=names,
        PALETTE=palette,
        time=time.asctime(),
        iter=int(step or 0),
        exported_by=f"rankseg_jax {rankseg_jax.__version__}",
        source=source,
        rankseg_jax_config=config.to_json_best_effort(),
    )
    return {"meta": meta, "state_dict": collections.OrderedDict(state_dict)}


def _normalization(config: ml_collections.ConfigDict) -> str:
    """Segmenter's name for the input normalisation ('vit' = mean/std 0.5, 'deit' = ImageNet)."""
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    if mean == (127.5,) * 3 and std == (127.5,) * 3:
        return "vit"
    if mean == readers.IMAGENET_MEAN and std == readers.IMAGENET_STD:
        return "deit"
    raise ConfigError(
        f"data.mean={mean}, data.std={std}: the official Segmenter knows only 'vit' "
        "(127.5/127.5) and 'deit' (ImageNet) normalisation"
    )


def check_segmenter_layout(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError unless the official Segmenter code builds this exact model.

    Its `create_decoder` derives the mask decoder from the encoder (width D, D/64 heads,
    4D MLP) and `create_vit` uses a 4D MLP; anything else would load wrongly or not at all.
    """
    m = config.model
    if m.classifier != "full" or m.oce:
        what = "an OCE backbone" if m.oce else f"head={_HEAD_NAMES[m.classifier]!r}"
        raise ConfigError(
            f"export.segmenter_layout: the official Segmenter has only the baseline mask "
            f"head, this model has {what}; use the mmseg .pth or .safetensors export"
        )
    dims = segmenter.vit_dims(m)
    width = dims["width"]
    wanted = dict(
        mlp_dim=4 * width, dec_width=width, dec_heads=max(width // 64, 1), dec_mlp_dim=4 * width
    )
    wrong = [f"{k}={dims[k]} (needs {v})" for k, v in wanted.items() if dims[k] != v]
    if wrong:
        raise ConfigError(
            "export.segmenter_layout: the official Segmenter derives these sizes from the "
            f"encoder width {width}: " + ", ".join(wrong)
        )
    _normalization(config)


def segmenter_variant(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `variant.yml` that `segm.model.factory.load_model` reads beside `checkpoint.pth`."""
    m, d = config.model, config.data
    dims = segmenter.vit_dims(m)
    normalization = _normalization(config)
    net = dict(
        backbone=_SEGMENTER_BACKBONES.get(m.variant, "vit_custom"),
        image_size=[int(s) for s in m.img_size],
        patch_size=int(m.patch_size),
        d_model=dims["width"],
        n_heads=dims["num_heads"],
        n_layers=dims["depth"],
        normalization=normalization,
        distilled=False,
        dropout=0.0,
        drop_path_rate=float(m.drop_path_rate),
        n_cls=int(m.n_cls),
        decoder=dict(
            name="mask_transformer",
            n_layers=dims["dec_layers"],
            drop_path_rate=float(m.dec_drop_path_rate),
            dropout=float(m.dropout),
        ),
    )
    short = int(min(d.test_scale))
    return dict(
        net_kwargs=net,
        dataset_kwargs=dict(
            dataset=d.dataset,
            image_size=short,
            crop_size=int(d.crop_size[0]),
            batch_size=1,
            normalization=normalization,
            split="val",
            num_workers=0,
        ),
        inference_kwargs=dict(
            im_size=short,
            window_size=int(config.eval.crop[0]),
            window_stride=int(config.eval.stride[0]),
        ),
    )


def segmenter_checkpoint(
    state_dict: Mapping[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """`{'model': official-named state dict (with the zero `encoder.head`), 'n_cls': n}`."""
    check_segmenter_layout(config)
    model = segmenter_layout.mmseg_to_segmenter(state_dict, n_cls=config.model.n_cls)
    return {"model": model, "n_cls": int(config.model.n_cls)}


def _write_text_atomic(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_export_config(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The requested formats, after checking everything that can be checked before writing."""
    formats = tuple(config.export.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not (formats or config.export.segmenter_layout):
        raise ConfigError(
            f"export.formats={formats}: choose from {', '.join(FORMATS)} "
            "(or set export.segmenter_layout)"
        )
    if config.export.segmenter_layout:
        if registry.is_multi_level(config.model):
            raise ConfigError(
                f"export.segmenter_layout: only for the ViT Segmenter, not model.encoder="
                f"{config.model.encoder!r} (its .pth is the mmseg layout: export.formats)"
            )
        check_segmenter_layout(config)
    return formats


def _save_pth(obj: Any, path: pathlib.Path, written: list[pathlib.Path]) -> None:
    try:
        torch_pickle.save_pth(obj, path)
    except ImportError:
        done = ", ".join(p.name for p in written) or "nothing"
        raise ConfigError(
            f"writing {path} needs PyTorch (pip install torch); written so far: {done}; "
            "without torch use --config.export.formats=safetensors"
        ) from None
    written.append(path)


def export_params(
    params: Any,
    config: ml_collections.ConfigDict,
    output: str | os.PathLike,
    source: str = "",
    step: int | None = None,
    model_state: Mapping[str, Any] | None = None,
) -> list[pathlib.Path]:
    """Write the exports of `params` (+ `model_state`: BN statistics of the conv families) that
    `config.export` asks for into the folder `output`.

    Order: safetensors + JSON (no torch), mmseg `.pth`, Segmenter layout. Raises ConfigError
    naming the files already written when torch is missing. Returns the written paths.
    """
    formats = check_export_config(config)
    output = pathlib.Path(output)
    state = state_dict_for_export(params, config, model_state)
    written: list[pathlib.Path] = []
    if "safetensors" in formats:
        description = model_description(config, source, step)
        sidecar = safetensors_io.save_safetensors(state, output / SAFETENSORS, description)
        written += [output / SAFETENSORS, sidecar]
    if "pth" in formats:
        _save_pth(mmseg_checkpoint(state, config, source, step), output / MMSEG_PTH, written)
    if config.export.segmenter_layout:
        folder = output / SEGMENTER_DIR
        _save_pth(segmenter_checkpoint(state, config), folder / "checkpoint.pth", written)
        text = yaml.safe_dump(segmenter_variant(config), sort_keys=False)
        _write_text_atomic(folder / "variant.yml", text)
        written.append(folder / "variant.yml")
    return written


def output_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
    """`export.output`, or `<workdir>/export` when it is empty."""
    return pathlib.Path(config.export.output or pathlib.Path(workdir) / "export")
