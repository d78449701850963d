"""Hand-built ``torch.save`` files for tests, written without torch.

``build_pickle`` emits protocol-2 pickle opcodes directly, so a test can produce exactly what a
given torch version wrote (``GLOBAL torch FloatStorage``, ``_rebuild_tensor_v2``, persistent ids)
without importing torch, and ``write_torch_zip`` lays the records out as torch 1.6-1.x did
(``archive/data.pkl``, ``archive/data/<key>``, ``archive/version``; no ``byteorder`` record).
"""

from __future__ import annotations

import collections
import dataclasses
import struct
import zipfile
from typing import Any

import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor as ``_rebuild_tensor_v2`` sees it: a strided view of storage ``key``."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    location: str = "cpu"


@dataclasses.dataclass(frozen=True)
class Global:
    """A raw ``GLOBAL module name`` reference, called with ``args`` (for hostile pickles)."""

    module: str
    name: str
    args: tuple = ()


def _unicode(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _emit(obj: Any) -> bytes:
    if obj is None:
        return b"N"
    if obj is True:
        return b"\x88"
    if obj is False:
        return b"\x89"
    if isinstance(obj, int):
        return _int(obj)
    if isinstance(obj, float):
        return b"G" + struct.pack(">d", obj)
    if isinstance(obj, str):
        return _unicode(obj)
    if isinstance(obj, TensorSpec):
        storage = b"(" + _unicode("storage")
        storage += _global("torch", _STORAGE_NAMES[np.dtype(obj.dtype)])
        storage += _unicode(obj.key) + _unicode(obj.location) + _int(obj.numel) + b"tQ"
        hooks = _global("collections", "OrderedDict") + b")R"
        args = storage + _emit(obj.offset) + _emit(obj.size) + _emit(obj.stride) + b"\x89" + hooks
        return _global("torch._utils", "_rebuild_tensor_v2") + b"(" + args + b"tR"
    if isinstance(obj, Global):
        return _global(obj.module, obj.name) + _emit(tuple(obj.args)) + b"R"
    if isinstance(obj, tuple):
        return b"(" + b"".join(_emit(v) for v in obj) + b"t"
    if isinstance(obj, list):
        return b"](" + b"".join(_emit(v) for v in obj) + b"e"
    if isinstance(obj, dict):
        head = (
            _global("collections", "OrderedDict") + b")R"
            if isinstance(obj, collections.OrderedDict)
            else b"}"
        )
        items = b"".join(_emit(k) + _emit(v) for k, v in obj.items())
        return head + b"(" + items + b"u"
    raise TypeError(f"build_pickle cannot emit {type(obj).__name__}")


def build_pickle(obj: Any) -> bytes:
    """Protocol-2 pickle bytes of ``obj`` (plain values, TensorSpec, Global)."""
    return b"\x80\x02" + _emit(obj) + b"."


def write_torch_zip(
    path: str,
    data_pkl: bytes,
    storages: dict[str, bytes],
    *,
    prefix: str = "archive",
    byteorder: str | None = None,
    version: bytes = b"3\n",
) -> None:
    """Write a ``torch.save``-style zip: data.pkl, data/<key> records, optional byteorder."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"{prefix}/data/{key}", raw)
        zf.writestr(f"{prefix}/version", version)


def write_state_dict_pth(
    path: str, state_dict: dict[str, np.ndarray], *, key: str | None = "state_dict"
):
    """A ``torch.save({key: OrderedDict(name -> tensor)})`` file of contiguous little-endian
    arrays (mmseg's checkpoint layout when key="state_dict"; the bare ``OrderedDict`` when key
    is None, as ``torch.save(model.state_dict())`` writes it), written without torch."""
    specs, storages = collections.OrderedDict(), {}
    for index, (name, value) in enumerate(state_dict.items()):
        array = np.asarray(value, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        storage = str(index)
        storages[storage] = array.tobytes()
        stride = tuple(int(s) // array.itemsize for s in array.strides)
        specs[name] = TensorSpec(storage, array.dtype.newbyteorder("="), array.size, 0,
                                 tuple(array.shape), stride)  # fmt: skip
    write_torch_zip(path, build_pickle(specs if key is None else {key: specs}), storages)
