"""Weights files → Flax params for a model: one entry point for every supported format.

Formats: mmseg `.pth` (the RankSeg release; read without torch when torch is absent), the
official Segmenter `.pth` (`model` dict), `.safetensors` (our export), and AugReg `.npz`
(backbone only; the head keeps the given initial params).

Conv families (decode heads with a `STATE_DICT` converter in the model registry, e.g.
DeepLabV3): the whole mmseg layout, BN running statistics included, loads into variables
{'params', 'batch_stats'} (`load_variables`); an mmcv ImageNet backbone checkpoint (keys
`stem.*`, `layer*.*`, e.g. `resnet101_v1c`) fills the `backbone` of the given initial
variables (the classifier `fc.*` is dropped); so do the public Swin and BEiT classification
files of the UperNet rows (convert/mmseg_upernet.pretrained_backbone: renamed, BEiT's relative
position tables interpolated to the model's grid; Swin's stage norms and BEiT's fpn necks keep
their initial values).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from rankseg_jax import checkpoint
from rankseg_jax.convert import mmseg, mmseg_conv, mmseg_upernet
from rankseg_jax.convert.augreg_npz import augreg_npz_to_mmseg
from rankseg_jax.convert.safetensors_io import load_safetensors
from rankseg_jax.convert.segmenter_layout import state_dict_from_checkpoint
from rankseg_jax.convert.torch_pickle import load_pth
from rankseg_jax.errors import CheckpointError
from rankseg_jax.models import registry
from rankseg_jax.weights import local_path

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def expected_variables(model, config: ml_collections.ConfigDict) -> dict:
    """Shapes of all the model's variables ({'params'[, 'batch_stats']}), no allocation."""
    size = tuple(config.model.img_size)
    images = jnp.zeros((1, *size, 3), jnp.float32)
    labels = jnp.zeros((1, *size), jnp.int32)
    return dict(jax.eval_shape(model.init, jax.random.PRNGKey(0), images, gt_labels=labels))


def expected_params(model, config: ml_collections.ConfigDict):
    """Shapes of the model's params (no allocation), used to check a state dict."""
    return expected_variables(model, config)["params"]


def expected_model_state(model, config: ml_collections.ConfigDict) -> dict:
    """Shapes of the model's non-param collections ({} for Segmenter)."""
    return {k: v for k, v in expected_variables(model, config).items() if k != "params"}


def read_state_dict(path: str | pathlib.Path, grid: tuple[int, int] | None = None) -> dict:
    """The mmseg-named state dict (float32 numpy) stored in a weights file of any format.

    `grid` is the model's stored patch grid; AugReg position embeddings are resized to it.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory; orbax workdirs load via load_params")
    if path.suffix in TORCH_SUFFIXES:
        return state_dict_from_checkpoint(load_pth(path))
    if path.suffix == ".safetensors":
        return load_safetensors(path)[0]
    if path.suffix == ".npz":
        return augreg_npz_to_mmseg(path, grid=grid)
    raise CheckpointError(
        f"{path}: unsupported weights format {path.suffix!r} (.pth, .safetensors or .npz)"
    )


_HEAD_HINTS = {
    "full": "a baseline Segmenter, as every official-Segmenter-layout file: use head=mask",
    "rankseg": "use a head=rankseg config",
    "gt": "a GT-oracle checkpoint: use a head=gt config",
}


def check_model_sizes(state: dict, config: ml_collections.ConfigDict, path) -> None:
    """Head kind, n_cls and k mismatches get their own message before the key lists."""
    m = config.model
    kind = "rankseg" if "decode_head.ml_fc.W" in state else None
    kind = "gt" if "decode_head.mask_norm.gamma" in state else kind
    if kind is None and "decode_head.mask_norm.weight" in state:
        kind = "full"
    if kind and kind != m.classifier:
        raise CheckpointError(
            f"{path}: checkpoint has a {kind!r} head, config model.classifier={m.classifier!r} "
            f"({_HEAD_HINTS[kind]})"
        )
    oce = "backbone.cls_emb" in state
    if oce != bool(m.oce) and ("decode_head.cls_emb" in state or oce):
        has = "has" if oce else "has no"
        raise CheckpointError(
            f"{path}: checkpoint {has} OCE backbone class embeddings (backbone.cls_emb), "
            f"config model.oce={m.oce}"
        )
    cls_emb = state.get("decode_head.cls_emb", state.get("backbone.cls_emb"))
    if cls_emb is not None and cls_emb.shape[1] != m.n_cls:
        raise CheckpointError(
            f"{path}: checkpoint has n_cls={cls_emb.shape[1]}, config model.n_cls={m.n_cls}"
        )
    mask_norm = state.get("decode_head.mask_norm.weight")
    if m.classifier == "rankseg" and mask_norm is not None and mask_norm.shape[0] != m.k:
        raise CheckpointError(
            f"{path}: checkpoint has k={mask_norm.shape[0]}, config model.k={m.k}"
        )


def _backbone_only(expected, base_params):
    """Split the expected tree: the backbone is loaded, the rest comes from `base_params`."""
    if base_params is None:
        raise CheckpointError("an AugReg .npz holds only the backbone: pass base_params")
    backbone = {k: v for k, v in expected["backbone"].items() if k != "cls_emb"}  # OCE: not in npz
    return {"backbone": backbone}


def load_variables(path, model, config: ml_collections.ConfigDict, base_variables=None) -> dict:
    """All the model's variables from a weights file: {'params'} for Segmenter (`load_params`),
    {'params', 'batch_stats'} for the conv families (mmseg layout, strict; or an ImageNet
    backbone on top of `base_variables`). An orbax workdir gives its params and model_state.
    """
    converter = registry.state_dict_module(config.model)
    local = local_path(path)
    if local.is_dir():
        params = _orbax_params(local, model, config)
        return {"params": params, **_orbax_model_state(local, model, config)}
    if converter is None:
        base = None if base_variables is None else base_variables["params"]
        return {"params": load_params(local, model, config, base)}
    state = read_state_dict(local)
    expected = expected_variables(model, config)
    if not any(k.startswith(("backbone.", "decode_head.")) for k in state):
        kind = mmseg_upernet.pretrained_kind(state)  # Swin / BEiT classification files
        if base_variables is None or ("stem.0.weight" not in state and kind is None):
            raise CheckpointError(
                f"{local}: neither a {config.model.decode_head} checkpoint (backbone.*, "
                "decode_head.*) nor an ImageNet backbone (ResNet stem.*, Swin layers.*, BEiT "
                "blocks.*)"
            )
        if kind is None:
            backbone = mmseg_conv.imagenet_backbone(state, expected, str(local))
        else:
            backbone = mmseg_upernet.pretrained_backbone(state, expected, str(local))
        merged = {}
        for collection, tree in base_variables.items():
            flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep="/")
            if collection in backbone:
                flat.update(traverse_util.flatten_dict(backbone[collection], sep="/"))
            merged[collection] = traverse_util.unflatten_dict(flat, sep="/")
        return jax.tree.map(jnp.asarray, merged)
    variables = converter.state_dict_to_variables(state, expected, str(local))
    return jax.tree.map(jnp.asarray, variables)


def load_params(path, model, config: ml_collections.ConfigDict, base_params=None):
    """Params for `model` from a weights file; every mismatch is reported in one message.

    For an AugReg `.npz` only the backbone is read (its position embedding resized to the
    model's grid with torch bicubic) and the head is taken from `base_params`. `path` may also
    be a registry name or an http(s) URL (rankseg_jax.weights), fetched into the cache first.
    """
    path = local_path(path)
    if path.is_dir():
        return _orbax_params(path, model, config)
    if registry.state_dict_module(config.model) is not None:
        base = None if base_params is None else {"params": base_params}
        return load_variables(path, model, config, base)["params"]
    grid = tuple(s // config.model.patch_size for s in config.model.img_size)
    state = read_state_dict(path, grid)
    check_model_sizes(state, config, path)
    expected = expected_params(model, config)
    if path.suffix == ".npz":
        expected = _backbone_only(expected, base_params)
    params = mmseg.state_dict_to_params(
        state, expected, gt_head=config.model.classifier == "gt", source=str(path)
    )
    if path.suffix == ".npz":
        flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, base_params), sep="/")
        flat.update(traverse_util.flatten_dict(params, sep="/"))
        params = traverse_util.unflatten_dict(flat, sep="/")
    return jax.tree.map(jnp.asarray, params)


def _orbax_model_state(path: pathlib.Path, model, config: ml_collections.ConfigDict) -> dict:
    """The model_state item ({} for models without one) of an orbax workdir or step folder."""
    abstract = expected_model_state(model, config)
    if (path / "checkpoints").is_dir():
        return checkpoint.restore_model_state(path, abstract)
    return checkpoint.restore_model_state(path.parent.parent, abstract, int(path.name))


def _orbax_params(path: pathlib.Path, model, config: ml_collections.ConfigDict):
    """Params of an orbax training workdir (its latest step) or of one step folder."""

    abstract = expected_params(model, config)
    if (path / "checkpoints").is_dir():
        return checkpoint.restore_params(path, abstract)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return checkpoint.restore_params(path.parent.parent, abstract, int(path.name))
    raise CheckpointError(
        f"{path}: not an orbax workdir (no checkpoints/ inside) nor a checkpoints/<step> folder"
    )
