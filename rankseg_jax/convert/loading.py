"""Weights files → Flax params for a model: one entry point for every supported format."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rankseg_jax.convert import mmseg


class CheckpointFormatError(ValueError):
    """A weights file that cannot be read (missing, unknown format)."""


def expected_params(model, config: ml_collections.ConfigDict):
    """Shapes of the model's params (no allocation), used to check a state dict."""
    size = tuple(config.model.img_size)
    images = jnp.zeros((1, *size, 3), jnp.float32)
    labels = jnp.zeros((1, *size), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), images, gt_labels=labels)["params"]


def read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The mmseg-named state dict stored in a .pth file."""
    try:
        import torch
    except ImportError as exc:
        raise CheckpointFormatError(f"{path}: reading .pth files needs torch") from exc
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: not an mmseg checkpoint (no state_dict)")
    return {k.removeprefix("module."): v.float().numpy() for k, v in state.items()}


def check_model_sizes(state: dict, config: ml_collections.ConfigDict, path) -> None:
    """Head kind, width, n_cls and k mismatches get their own message before the key lists."""
    m = config.model
    kind = "rankseg" if "decode_head.ml_fc.W" in state else None
    kind = "gt" if "decode_head.mask_norm.gamma" in state else kind
    if kind is None and "decode_head.mask_norm.weight" in state:
        kind = "mask"
    if kind and kind != m.head:
        raise mmseg.CheckpointMismatchError(
            f"{path}: checkpoint has a {kind!r} head, config model.head={m.head!r}"
        )
    ml_fc = state.get("decode_head.ml_fc.b")
    if ml_fc is not None and ml_fc.shape[-1] != m.n_cls:
        raise mmseg.CheckpointMismatchError(
            f"{path}: checkpoint has n_cls={ml_fc.shape[-1]}, config model.n_cls={m.n_cls}"
        )
    mask_norm = state.get("decode_head.mask_norm.weight")
    if m.head == "rankseg" and mask_norm is not None and mask_norm.shape[0] != m.k:
        raise mmseg.CheckpointMismatchError(
            f"{path}: checkpoint has k={mask_norm.shape[0]}, config model.k={m.k}"
        )


def load_params(path, model, config: ml_collections.ConfigDict):
    """Params for `model` from a weights file (.pth in mmseg layout)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix != ".pth":
        raise CheckpointFormatError(f"{path}: unsupported checkpoint format {path.suffix!r}")
    state = read_state_dict(path)
    check_model_sizes(state, config, path)
    expected = expected_params(model, config)
    params = mmseg.state_dict_to_params(
        state, expected, gt_head=config.model.head == "gt", source=str(path)
    )
    return jax.tree.map(jnp.asarray, params)
