"""State dicts as ``.safetensors`` plus a JSON sidecar, without torch.

``.safetensors`` is the torch-free interchange file: ``safetensors.torch.load_file`` reads it
into PyTorch and nothing in it can run code. Beside ``model.safetensors`` we write
``model.json`` with the model's description (variant, n_cls, k, img_size, mean/std, class
names ... whatever dict the caller gives), so a reader needs no config file. The same JSON and
the key order are also stored in the safetensors header (``__metadata__``), because safetensors
itself sorts tensors and a lone ``.safetensors`` file should still be complete.

Both files are written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

__all__ = ["load_safetensors", "save_safetensors", "sidecar_path"]

_META_KEY = "rankseg_jax.metadata"
_ORDER_KEY = "rankseg_jax.key_order"


def sidecar_path(path: str | os.PathLike) -> pathlib.Path:
    """``model.safetensors`` -> ``model.json``."""
    return pathlib.Path(path).with_suffix(".json")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _metadata_json(metadata: Mapping[str, Any]) -> str:
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r}")
        try:
            json.dumps(value, default=_json_default)
        except (TypeError, ValueError) as err:
            raise TypeError(f"metadata entry '{key}' cannot be written as JSON: {err}") from None
    return json.dumps(dict(metadata), default=_json_default, indent=2, sort_keys=False)


def _atomic_write(path: pathlib.Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``; never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_safetensors(
    sd: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Write ``sd`` to ``path`` (``.safetensors``) and ``metadata`` to the JSON beside it.

    Arrays are stored bit for bit in their own dtype (float32, bfloat16 via ml_dtypes, int64,
    bool, ...); non-contiguous arrays are made C-contiguous first. Returns the sidecar path.
    """
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors file name")
    tensors: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise TypeError(f"state dict entry {key!r} is {type(value).__name__}, not an array")
        # (np.ascontiguousarray would turn a 0-d array, e.g. num_batches_tracked, into (1,))
        tensors[key] = np.ascontiguousarray(value).reshape(value.shape)
    meta_json = _metadata_json(metadata or {})
    header = {_META_KEY: meta_json, _ORDER_KEY: json.dumps(list(tensors))}
    _atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=header))
    sidecar = sidecar_path(path)
    _atomic_write(sidecar, lambda tmp: pathlib.Path(tmp).write_text(meta_json + "\n"))
    return sidecar


def load_safetensors(
    path: str | os.PathLike,
) -> tuple[collections.OrderedDict[str, np.ndarray], dict[str, Any]]:
    """Read ``(state_dict, metadata)``: tensors in their saved order, metadata from the JSON
    sidecar if present, else from the file header ({} for a foreign file without either)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    try:
        tensors = safetensors.numpy.load_file(str(path))
        with safetensors.safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError
        raise ValueError(f"{path}: not a readable .safetensors file: {err}") from None
    order = json.loads(header.get(_ORDER_KEY, "[]"))
    if sorted(order) != sorted(tensors):
        order = list(tensors)
    sd = collections.OrderedDict((k, tensors[k]) for k in order)
    sidecar = sidecar_path(path)
    try:
        text = sidecar.read_text() if sidecar.is_file() else header.get(_META_KEY, "{}")
        metadata = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{sidecar}: metadata is not valid JSON: {err}") from None
    return sd, metadata
