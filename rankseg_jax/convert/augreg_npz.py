"""AugReg ViT ``.npz`` (big_vision / vision_transformer) -> mmseg backbone state dict.

This reproduces what the reference does at train start (rankseg-spec.md 6.3 and 1.8):
``helpers/vit.py::load_weights_from_npz`` builds PyTorch-layout tensors, then the backbone's
``init_weights`` resizes the position embedding from the npz grid (24x24 for the res-384 files)
to ``img_size / patch`` with PyTorch bicubic (align_corners=False, cls entry kept apart). The
result uses the mmseg key names of rankseg-spec.md 6.2 (``backbone.layers.{i}.attn.attn.
in_proj_weight``, ...), float32 C-contiguous, so it feeds the same mmseg -> Flax mapping as a
``.pth`` checkpoint.
"""

from __future__ import annotations

import collections
import math
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from rankseg_jax.errors import CheckpointError

__all__ = ["CheckpointError", "augreg_npz_to_mmseg", "augreg_to_mmseg", "load_augreg_npz"]

_PREFIX = "opt/target/"


def load_augreg_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of an AugReg ``.npz``, with an ``opt/target/`` prefix removed if present.

    Read with ``allow_pickle=False``, so an object array in the file is an error, not code.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AugReg checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a readable .npz file: {err}") from None
    if _PREFIX + "embedding/kernel" in arrays:
        arrays = {k[len(_PREFIX) :]: v for k, v in arrays.items() if k.startswith(_PREFIX)}
    return arrays


def resize_pos_embed(
    pos_embed: np.ndarray, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize a (1, 1 + h*w, D) position embedding to (1, 1 + H*W, D), PyTorch-bicubic.

    The cls entry (index 0) is kept apart; the row-major grid part is resized with
    ``jax.image.resize(method=CUBIC_PYTORCH, antialias=False)``, which matches
    ``F.interpolate(mode='bicubic', align_corners=False)`` (A = -0.75, edge-clamped taps). Runs
    on the CPU: a one-off conversion that must not grab an accelerator. ``old_grid`` defaults to
    the square grid implied by the length.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise CheckpointError(f"pos_embed must be (1, 1 + h*w, D), got {pos_embed.shape}")
    tokens, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    if old_grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise CheckpointError(f"pos_embed grid of {tokens} tokens is not square; give old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != tokens:
        grid = f"{old_grid[0]}x{old_grid[1]}"
        raise CheckpointError(f"pos_embed has {tokens} grid tokens, not {grid}")
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return np.ascontiguousarray(pos_embed, dtype=np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        grid = jnp.asarray(pos_embed[0, 1:], jnp.float32).reshape(*old_grid, dim)
        resized = jax.image.resize(
            grid,
            (*new_grid, dim),
            method=jax.image.ResizeMethod.CUBIC_PYTORCH,
            antialias=False,
        )
        resized = np.asarray(resized).reshape(1, new_grid[0] * new_grid[1], dim)
    cls = np.asarray(pos_embed[:, :1], np.float32)
    return np.ascontiguousarray(np.concatenate([cls, resized], axis=1))


def _num_blocks(arrays: dict[str, np.ndarray]) -> int:
    found = {
        int(m.group(1))
        for k in arrays
        if (m := re.match(r"Transformer/encoderblock_(\d+)/", k)) is not None
    }
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"encoder blocks are not numbered 0..n-1 (found {sorted(found)})")
    return len(found)


def _block(get, i: int, dim: int) -> list[tuple[str, np.ndarray]]:
    """mmseg tensors of encoder block ``i``: (name, array) in state-dict order."""
    base = f"Transformer/encoderblock_{i}/"
    att = base + "MultiHeadDotProductAttention_1/"
    # query/key/value kernels (D, H, Dh) -> (D, D) [in, out] -> (out, in), stacked q, k, v.
    in_proj_weight = np.concatenate(
        [get(f"{att}{n}/kernel").reshape(dim, dim).T for n in ("query", "key", "value")]
    )
    in_proj_bias = np.concatenate(
        [get(f"{att}{n}/bias").reshape(-1) for n in ("query", "key", "value")]
    )
    out_weight = get(att + "out/kernel").reshape(dim, dim).T  # (H, Dh, D) -> (out=D, in=H*Dh)
    mlp = base + "MlpBlock_3/"
    return [
        ("ln1.weight", get(base + "LayerNorm_0/scale")),
        ("ln1.bias", get(base + "LayerNorm_0/bias")),
        ("attn.attn.in_proj_weight", in_proj_weight),
        ("attn.attn.in_proj_bias", in_proj_bias),
        ("attn.attn.out_proj.weight", out_weight),
        ("attn.attn.out_proj.bias", get(att + "out/bias")),
        ("ln2.weight", get(base + "LayerNorm_2/scale")),
        ("ln2.bias", get(base + "LayerNorm_2/bias")),
        ("ffn.layers.0.0.weight", get(mlp + "Dense_0/kernel").T),
        ("ffn.layers.0.0.bias", get(mlp + "Dense_0/bias")),
        ("ffn.layers.1.weight", get(mlp + "Dense_1/kernel").T),
        ("ffn.layers.1.bias", get(mlp + "Dense_1/bias")),
    ]


def augreg_to_mmseg(
    arrays: dict[str, np.ndarray],
    *,
    grid: tuple[int, int] | None = None,
    prefix: str = "backbone.",
    source: str = "AugReg npz",
) -> collections.OrderedDict[str, np.ndarray]:
    """AugReg arrays (no ``opt/target/`` prefix) -> mmseg backbone tensors, float32.

    ``grid`` is the target patch grid (img_size // patch, e.g. (32, 32) for ViT-B/16 at 512);
    None keeps the npz grid. ``head/*`` and ``pre_logits/*`` are not used. ``source`` names the
    file in error messages.
    """

    def get(name: str) -> np.ndarray:
        if name not in arrays:
            raise CheckpointError(f"{source}: missing array '{name}'")
        return np.asarray(arrays[name], dtype=np.float32)

    kernel = get("embedding/kernel")  # (P, P, C, D) HWIO
    if kernel.ndim != 4:
        raise CheckpointError(f"{source}: embedding/kernel must be 4-D HWIO, got {kernel.shape}")
    dim = kernel.shape[-1]
    pos_embed = get("Transformer/posembed_input/pos_embedding")
    if grid is not None:
        pos_embed = resize_pos_embed(pos_embed, grid)
    tensors = [
        ("cls_token", get("cls").reshape(1, 1, dim)),
        ("pos_embed", pos_embed),
        ("patch_embed.projection.weight", kernel.transpose(3, 2, 0, 1)),  # -> OIHW
        ("patch_embed.projection.bias", get("embedding/bias")),
    ]
    for i in range(_num_blocks(arrays)):
        tensors += [(f"layers.{i}.{name}", value) for name, value in _block(get, i, dim)]
    tensors += [
        ("ln1.weight", get("Transformer/encoder_norm/scale")),
        ("ln1.bias", get("Transformer/encoder_norm/bias")),
    ]
    return collections.OrderedDict(
        (prefix + name, np.ascontiguousarray(value, dtype=np.float32)) for name, value in tensors
    )


def augreg_npz_to_mmseg(
    path: str | os.PathLike, *, grid: tuple[int, int] | None = None, prefix: str = "backbone."
) -> collections.OrderedDict[str, np.ndarray]:
    """Read an AugReg ``.npz`` and convert it (see :func:`augreg_to_mmseg`)."""
    return augreg_to_mmseg(load_augreg_npz(path), grid=grid, prefix=prefix, source=os.fspath(path))
