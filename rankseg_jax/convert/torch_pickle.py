"""Read (and, with torch, write) PyTorch ``.pth`` checkpoints as numpy, without running their code.

A ``torch.save`` file is a zip archive ``<prefix>/data.pkl`` + ``<prefix>/data/<key>``: the pickle
holds the object structure and refers to each tensor's raw bytes through a persistent id
``('storage', <torch.XStorage class>, key, location, numel)``. The rest (``byteorder``,
``.format_version``, ``.storage_alignment``, ``version``, ``.data/serialization_id``) are small text
records; torch 1.6-1.x files (e.g. torch 1.8.1, prefix ``archive/``) have no ``byteorder`` record
and are little-endian.

The torch-free reader uses a restricted unpickler. Its ``find_class`` allow-list is exactly

* ``collections.OrderedDict`` (state dicts and the empty ``backward_hooks``),
* ``torch._utils._rebuild_tensor_v2`` and ``torch._utils._rebuild_parameter``,
* the storage types ``torch.{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool}Storage``
  (what every torch version writes for those dtypes, also for CUDA tensors) and
  ``torch.storage.UntypedStorage`` / ``torch.UntypedStorage`` (raw bytes, as uint8).
  ``torch.storage.TypedStorage`` never appears in a file: torch converts it to the legacy
  ``torch.XStorage`` name when saving, so it is not allowed.

Everything else (``os.system``, ``builtins.eval``, numpy scalars, ``builtins.set``, bytes in
protocol 2 via ``_codecs.encode``, ``torch._utils._rebuild_tensor_v3`` for uint16/float8 ...) is
refused with :class:`UnsafeCheckpointError` naming ``module.name``. Plain pickle values (str, int,
float, bool, None, tuple, list, dict) need no global and are allowed: that is all mmcv's ``meta``
(config text, CLASSES, PALETTE, seed, versions, time, epoch, iter) and an SGD/AdamW optimizer
state contain. ``torch.load(weights_only=True)`` also refuses numpy scalars by default, so both
readers agree.

Tensors come back as C-contiguous numpy arrays that own their memory, with their dtype kept:
float32/float64/float16, bfloat16 as ``ml_dtypes.bfloat16`` (bit-exact; ml_dtypes ships with
jax), int64/int32/int16/int8/uint8, bool. ``state_dict_from_checkpoint`` then casts floating
arrays to float32 for the model mapping.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointError",
    "LegacyCheckpointError",
    "UnsafeCheckpointError",
    "load_pth",
    "mmseg_to_segmenter",
    "save_pth",
    "segmenter_to_mmseg",
    "state_dict_from_checkpoint",
]


class CheckpointError(ValueError):
    """A file that is not a readable PyTorch checkpoint, or a checkpoint without a state dict."""


class LegacyCheckpointError(CheckpointError):
    """A pre-1.6 (non-zip) ``torch.save`` file: re-save it with a recent torch."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks for a global outside the allow-list (it could run code)."""


# Storage class name (as pickled) -> numpy dtype of one element.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "torch.FloatStorage": np.dtype(np.float32),
    "torch.HalfStorage": np.dtype(np.float16),
    "torch.BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "torch.DoubleStorage": np.dtype(np.float64),
    "torch.LongStorage": np.dtype(np.int64),
    "torch.IntStorage": np.dtype(np.int32),
    "torch.ShortStorage": np.dtype(np.int16),
    "torch.CharStorage": np.dtype(np.int8),
    "torch.ByteStorage": np.dtype(np.uint8),
    "torch.BoolStorage": np.dtype(np.bool_),
    "torch.storage.UntypedStorage": np.dtype(np.uint8),
    "torch.UntypedStorage": np.dtype(np.uint8),
}

_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_RESAVE_HINT = (
    're-save it with a recent torch (>= 1.6): python -c "import torch; '
    "torch.save(torch.load('OLD.pth', map_location='cpu', weights_only=True), 'NEW.pth')\""
)


# --------------------------------------------------------------------------------------------
# Restricted unpickler: placeholders instead of torch objects, materialised after unpickling.


class _Refuse:
    """Objects the unpickler hands out must not be re-configured by a BUILD opcode."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"BUILD on a {type(self).__name__} is not allowed")


class _StorageType(_Refuse):
    """Stands for a ``torch.XStorage`` class inside the pickle (only used in persistent ids)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name, self.dtype = name, dtype


class _StorageRef(_Refuse):
    """One ``data/<key>`` record: ``numel`` elements of ``dtype``."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: np.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel

    @property
    def cache_key(self) -> tuple[str, str, int]:
        """Key, dtype and size: a record read one way is never reused as another."""
        return (self.key, self.dtype.str, self.numel)


class _TensorRef(_Refuse):
    """A strided view into a storage, as ``_rebuild_tensor_v2`` describes it."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    """Safe stand-in for ``torch._utils._rebuild_tensor_v2``; checks every argument's type."""
    del requires_grad, backward_hooks, metadata  # no meaning for numpy arrays
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("_rebuild_tensor_v2: first argument is not a storage")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool):
        raise pickle.UnpicklingError("_rebuild_tensor_v2: storage offset is not an int")
    if not (_is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError("_rebuild_tensor_v2: size/stride are not int tuples")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """Safe stand-in for ``torch._utils._rebuild_parameter``: a Parameter is just its tensor."""
    del requires_grad, backward_hooks
    if not isinstance(data, _TensorRef):
        raise pickle.UnpicklingError("_rebuild_parameter: argument is not a tensor")
    return data


_ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    **{name: _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals and torch's storage ids.

    ``uses`` counts the references to each storage key, so that materialising can drop a
    storage's bytes after its last tensor (peak memory about one checkpoint, not two).
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.uses: collections.Counter[tuple] = collections.Counter()

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in _ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f"refusing to load global '{qualified}': only tensors, storages, OrderedDict and "
                "plain python values are allowed in a checkpoint"
            )
        return _ALLOWED_GLOBALS[qualified]

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("persistent id does not name a storage type")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if not (isinstance(key, str) and re.fullmatch(r"[0-9]+", key)):
            raise pickle.UnpicklingError(f"bad storage key {str(key)[:40]!r}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage size for key {key}")
        ref = _StorageRef(key, storage_type.dtype, numel)
        self.uses[ref.cache_key] += 1
        return ref


# --------------------------------------------------------------------------------------------
# Zip archive access.


class _Archive:
    """The records of a ``torch.save`` zip, found under its single top-level folder."""

    def __init__(self, path: str, zf: zipfile.ZipFile) -> None:
        self.path, self.zf = path, zf
        self.uses: collections.Counter[tuple] = collections.Counter()
        names = zf.namelist()
        if not names or "/" not in names[0]:
            raise CheckpointError(f"{path}: zip archive without a top-level folder; not torch.save")
        self.prefix = names[0].split("/", 1)[0] + "/"
        self.names = set(names)
        if self.prefix + "data.pkl" not in self.names:
            raise CheckpointError(
                f"{path}: zip archive has no '{self.prefix}data.pkl' record; "
                "not a torch.save checkpoint (a TorchScript archive?)"
            )
        self.byteorder = "little"
        if self.prefix + "byteorder" in self.names:
            self.byteorder = self.read("byteorder").decode("ascii", "replace").strip()
            if self.byteorder not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder record {self.byteorder!r}")

    def read(self, record: str) -> bytes:
        return self.zf.read(self.prefix + record)

    def storage_array(self, ref: _StorageRef) -> np.ndarray:
        """The storage ``data/<key>`` as a 1-D read-only array of ``ref.numel`` elements."""
        record = f"data/{ref.key}"
        if self.prefix + record not in self.names:
            raise CheckpointError(f"{self.path}: storage record '{record}' is missing")
        raw = self.read(record)
        nbytes = ref.numel * ref.dtype.itemsize
        if len(raw) != nbytes:
            raise CheckpointError(
                f"{self.path}: storage '{record}' has {len(raw)} bytes, the pickle says {nbytes}"
            )
        dtype = ref.dtype
        if self.byteorder != sys.byteorder and dtype.itemsize > 1:
            swapped = np.frombuffer(raw, dtype=dtype.newbyteorder())
            return swapped.astype(dtype)
        return np.frombuffer(raw, dtype=dtype)


def _cached_storage(
    archive: _Archive, ref: _StorageRef, cache: dict[tuple, np.ndarray]
) -> np.ndarray:
    """The storage's array, kept in ``cache`` only while later tensors still use it.

    The use counts come from ``_RestrictedUnpickler.uses``; a storage dropped too early (a
    pickle that reuses one persistent id) is simply read again.
    """
    key = ref.cache_key
    flat = cache.get(key)
    if flat is None:
        flat = archive.storage_array(ref)
    if archive.uses[key] > 1:
        archive.uses[key] -= 1
        cache[key] = flat
    else:
        cache.pop(key, None)
    return flat


def _tensor_array(archive: _Archive, ref: _TensorRef, cache: dict[tuple, np.ndarray]) -> np.ndarray:
    """Materialise a strided view as an owned C-contiguous array, after a bounds check."""
    flat = _cached_storage(archive, ref.storage, cache)
    shape, strides = ref.size, ref.stride
    if any(s < 0 for s in shape) or any(s < 0 for s in strides) or ref.offset < 0:
        raise CheckpointError(f"{archive.path}: negative size, stride or offset in a tensor")
    if 0 in shape:
        return np.zeros(shape, dtype=flat.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    if last >= flat.size:
        raise CheckpointError(
            f"{archive.path}: tensor of shape {shape} reads past the end of storage "
            f"data/{ref.storage.key} ({flat.size} elements)"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=shape,
        strides=tuple(s * flat.dtype.itemsize for s in strides),
        writeable=False,
    )
    return np.array(view, order="C", copy=True)


_KEEP = object()  # returned by a leaf function for "not a leaf: recurse into it"


def _map_nested(obj: Any, leaf: Any, seen: dict[int, Any]) -> Any:
    """Rebuild a nested structure with `leaf(x)` replacing the values it recognises.

    Dicts and lists are updated in place, tuples rebuilt; shared containers stay shared.
    """
    replaced = leaf(obj)
    if replaced is not _KEEP:
        return replaced
    key = id(obj)
    if key in seen:
        return seen[key]
    if isinstance(obj, dict):
        seen[key] = obj
        for k in list(obj.keys()):
            obj[k] = _map_nested(obj[k], leaf, seen)
        return obj
    if isinstance(obj, list):
        seen[key] = obj
        for i, v in enumerate(obj):
            obj[i] = _map_nested(v, leaf, seen)
        return obj
    if isinstance(obj, tuple):
        out = tuple(_map_nested(v, leaf, seen) for v in obj)
        seen[key] = out
        return out
    return obj


def _materialise(obj: Any, convert: Any, seen: dict[int, Any]) -> Any:
    """Replace tensor/storage placeholders in a nested structure."""

    def leaf(value: Any) -> Any:
        if isinstance(value, (_TensorRef, _StorageRef)):
            return convert(value)
        if isinstance(value, _StorageType):
            raise CheckpointError("a storage type appears outside a storage reference")
        return _KEEP

    return _map_nested(obj, leaf, seen)


def _load_without_torch(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        archive = _Archive(path, zf)
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read("data.pkl")))
        try:
            obj = unpickler.load()
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{path}: {err}") from None
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt or unsupported data.pkl: {err}") from None
        except RecursionError:
            raise CheckpointError(f"{path}: data.pkl nests too deeply") from None
        archive.uses = unpickler.uses
        cache: dict[tuple, np.ndarray] = {}

        def convert(ref: _TensorRef | _StorageRef) -> np.ndarray:
            if isinstance(ref, _StorageRef):  # a bare storage: its elements as a 1-D array
                return np.array(archive.storage_array(ref), copy=True)
            return _tensor_array(archive, ref, cache)

        try:
            return _materialise(obj, convert, {})
        except RecursionError:
            raise CheckpointError(f"{path}: data.pkl nests too deeply") from None


# --------------------------------------------------------------------------------------------
# torch path.


def _torch_to_numpy(obj: Any, torch: Any, seen: dict[int, Any]) -> Any:
    """Nested torch objects -> the same structure with numpy arrays (bf16 via ml_dtypes)."""

    def leaf(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            if tensor.dtype == torch.bfloat16:
                return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
            return np.array(tensor.numpy(), order="C", copy=True)
        if isinstance(value, torch.storage.TypedStorage):
            return leaf(torch.empty(0, dtype=value.dtype).set_(value))
        if isinstance(value, torch.UntypedStorage):
            return np.frombuffer(bytes(value), dtype=np.uint8).copy()
        return _KEEP

    return _map_nested(obj, leaf, seen)


def _load_with_torch(path: str, torch: Any) -> Any:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        raise UnsafeCheckpointError(
            f"{path}: torch.load(weights_only=True) refused it: {' '.join(first[:3])}"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: torch could not read it: {err}") from None
    return _torch_to_numpy(obj, torch, {})


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _check_readable_zip(path: str) -> None:
    """Raise a clear error unless ``path`` is a zip-format ``torch.save`` file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a .pth file")
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC or tarfile.is_tarfile(path):
        raise LegacyCheckpointError(
            f"{path}: legacy (pre-1.6, non-zip) torch.save format is not supported; {_RESAVE_HINT}"
        )
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: a plain pickle, not a torch.save zip archive; if an old torch (< 1.6) or "
            f"_use_new_zipfile_serialization=False wrote it, {_RESAVE_HINT}"
        )
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip archive found)")


def load_pth(path: str | os.PathLike, *, use_torch: bool | None = None) -> Any:
    """Load a ``torch.save`` file as nested python values with numpy arrays for tensors.

    ``use_torch=None`` uses ``torch.load(weights_only=True)`` when torch is importable and the
    torch-free restricted reader otherwise; ``True`` requires torch, ``False`` never imports it.
    Both return the same structure (dict/OrderedDict/list/tuple/plain values) and bit-identical
    arrays. Both refuse pickled code (:class:`UnsafeCheckpointError`) and legacy non-zip files
    (:class:`LegacyCheckpointError`).
    """
    path = os.fspath(path)
    _check_readable_zip(path)
    torch = None if use_torch is False else _import_torch()
    if use_torch and torch is None:
        raise ImportError("load_pth(use_torch=True) needs torch; pass use_torch=None or False")
    if torch is not None:
        return _load_with_torch(path, torch)
    try:
        return _load_without_torch(path)
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"{path}: damaged zip archive: {err}") from None


# --------------------------------------------------------------------------------------------
# Writing (needs torch).


def _numpy_to_torch(obj: Any, torch: Any) -> Any:
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic):
        array = np.ascontiguousarray(obj)
        if array.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(array.copy())
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _numpy_to_torch(v, torch)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v, torch) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numpy_to_torch(v, torch) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_numpy_to_torch(v, torch) for v in obj)
    return obj


def save_pth(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` a nested structure of numpy arrays (as tensors), atomically.

    Needs torch (imported here). Writes a temporary file beside ``path`` and renames it, so a
    crash never leaves a half-written checkpoint. numpy scalars become 0-d tensors.
    """
    torch = _import_torch()
    if torch is None:
        raise ImportError(
            "save_pth needs PyTorch to write a .pth file (pip install torch); "
            "without torch, write .safetensors with rankseg_jax.convert.safetensors_io"
        )
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    converted = _numpy_to_torch(obj, torch)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(converted, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# State-dict layouts.

_SEGMENTER_TO_MMSEG_BLOCK = (
    ("norm1.", "ln1."),
    ("norm2.", "ln2."),
    ("attn.qkv.weight", "attn.attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.attn.in_proj_bias"),
    ("attn.proj.", "attn.attn.out_proj."),
    ("mlp.fc1.", "ffn.layers.0.0."),
    ("mlp.fc2.", "ffn.layers.1."),
)
_SEGMENTER_TO_MMSEG_TOP = (
    ("encoder.patch_embed.proj.", "backbone.patch_embed.projection."),
    ("encoder.cls_token", "backbone.cls_token"),
    ("encoder.pos_embed", "backbone.pos_embed"),
    ("encoder.norm.", "backbone.ln1."),
    ("decoder.", "decode_head."),
)
_MMSEG_ONLY_HEAD = ("decode_head.decoder_norm2.", "decode_head.ml_fc.", "decode_head.img_cls_head.")
# Registration order inside an official Segmenter `Block` (norm1, norm2, attn, mlp), which is
# its state_dict order; mmseg's encoder layer registers ln1, attn, ln2, ffn instead.
_SEGMENTER_BLOCK_ORDER = (
    "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight",
    "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
    "mlp.fc2.weight", "mlp.fc2.bias",
)  # fmt: skip
_MMSEG_LAYER_ORDER = (
    "ln1.weight", "ln1.bias", "attn.attn.in_proj_weight", "attn.attn.in_proj_bias",
    "attn.attn.out_proj.weight", "attn.attn.out_proj.bias", "ln2.weight", "ln2.bias",
    "ffn.layers.0.0.weight", "ffn.layers.0.0.bias", "ffn.layers.1.weight", "ffn.layers.1.bias",
)  # fmt: skip


def _rename_block(rest: str, table: tuple[tuple[str, str], ...], key: str) -> str:
    for src, dst in table:
        if rest.startswith(src):
            return dst + rest[len(src) :]
    raise CheckpointError(f"no mapping for block parameter '{key}'")


def _segmenter_key_to_mmseg(key: str) -> str | None:
    """One official-Segmenter key -> mmseg name; None for the unused ``encoder.head*``."""
    if key.startswith("encoder.head"):
        return None
    match = re.match(r"encoder\.blocks\.(\d+)\.(.+)$", key)
    if match:
        rest = _rename_block(match.group(2), _SEGMENTER_TO_MMSEG_BLOCK, key)
        return f"backbone.layers.{match.group(1)}.{rest}"
    for src, dst in _SEGMENTER_TO_MMSEG_TOP:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
    raise CheckpointError(f"official Segmenter key '{key}' has no mmseg counterpart")


def segmenter_to_mmseg(sd: Mapping[str, np.ndarray]) -> collections.OrderedDict[str, np.ndarray]:
    """Official Segmenter ``model`` state dict (``encoder.*``/``decoder.*``) -> mmseg names.

    Mapping of rankseg-spec.md 6.4; ``encoder.head.*`` (the unused 1000-way classifier) is
    dropped, ``decoder.*`` becomes ``decode_head.*`` with the same sub-names.
    """
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for key, value in sd.items():
        new = _segmenter_key_to_mmseg(key)
        if new is not None:
            out[new] = value
    return _block_order(out, "backbone.layers.", _MMSEG_LAYER_ORDER)


def _mmseg_key_to_segmenter(key: str) -> str:
    match = re.match(r"backbone\.layers\.(\d+)\.(.+)$", key)
    if match:
        inverse = tuple((dst, src) for src, dst in _SEGMENTER_TO_MMSEG_BLOCK)
        return f"encoder.blocks.{match.group(1)}.{_rename_block(match.group(2), inverse, key)}"
    if key.startswith(_MMSEG_ONLY_HEAD) or key == "backbone.cls_emb":
        raise CheckpointError(
            f"'{key}' has no counterpart in the official Segmenter model (a RankSeg/OCE/ablation "
            "head); only the baseline mask-transformer head exports to that layout"
        )
    for src, dst in _SEGMENTER_TO_MMSEG_TOP:
        if key == dst or (dst.endswith(".") and key.startswith(dst)):
            return src + key[len(dst) :]
    raise CheckpointError(f"mmseg key '{key}' has no official Segmenter counterpart")


def _block_order(
    sd: collections.OrderedDict[str, np.ndarray], prefix: str, order: tuple[str, ...]
) -> collections.OrderedDict[str, np.ndarray]:
    """Keys reordered inside each `<prefix><i>.` block as `order` (registration order) says.

    The official Segmenter Block registers norm1, norm2, attn, mlp; mmseg's encoder layer
    ln1, attn, ln2, ffn: renaming alone would keep the other code base's order.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+\.)(.+)$")
    first: dict[str, int] = {}
    ranks = []
    for position, key in enumerate(sd):
        match = pattern.match(key)
        if match and match.group(2) in order:
            start = first.setdefault(match.group(1), position)
            ranks.append((start, order.index(match.group(2)), key))
        else:
            ranks.append((position, -1, key))
    return collections.OrderedDict((key, sd[key]) for *_, key in sorted(ranks))


def mmseg_to_segmenter(
    sd: Mapping[str, np.ndarray], n_cls: int
) -> collections.OrderedDict[str, np.ndarray]:
    """mmseg Segmenter state dict -> the official rstrudel/segmenter ``model`` state dict.

    Adds the dummy ``encoder.head.weight`` (1000, D) / ``encoder.head.bias`` (1000,) zeros that
    ``create_vit`` always builds, so ``load_state_dict(strict=True)`` succeeds. Checks that
    ``decode_head.cls_emb`` is (1, n_cls, D). Write ``{"model": sd, "n_cls": n_cls}`` to get the
    file layout ``segm.model.factory.load_model`` reads.
    """
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for key, value in sd.items():
        out[_mmseg_key_to_segmenter(key)] = value
    out = _block_order(out, "encoder.blocks.", _SEGMENTER_BLOCK_ORDER)
    if "encoder.cls_token" not in out:
        raise CheckpointError("state dict has no 'backbone.cls_token'; not a Segmenter model")
    dim = out["encoder.cls_token"].shape[-1]
    cls_emb = out.get("decoder.cls_emb")
    if cls_emb is not None and tuple(cls_emb.shape) != (1, n_cls, dim):
        raise CheckpointError(
            f"decode_head.cls_emb has shape {tuple(cls_emb.shape)}, expected (1, {n_cls}, {dim})"
        )
    dtype = out["encoder.cls_token"].dtype
    ordered: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for key, value in out.items():  # the head goes right after encoder.norm, as torch orders it
        ordered[key] = value
        if key == "encoder.norm.bias":
            ordered["encoder.head.weight"] = np.zeros((1000, dim), dtype)
            ordered["encoder.head.bias"] = np.zeros((1000,), dtype)
    if "encoder.head.weight" not in ordered:
        ordered["encoder.head.weight"] = np.zeros((1000, dim), dtype)
        ordered["encoder.head.bias"] = np.zeros((1000,), dtype)
    return ordered


def _as_float32(key: str, value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"state dict entry '{key}' is {type(value).__name__}, not a tensor")
    if np.issubdtype(value.dtype, np.floating) or value.dtype == ml_dtypes.bfloat16:
        return np.asarray(value, dtype=np.float32, order="C")  # asarray keeps 0-d tensors 0-d
    return np.asarray(value, order="C")


def _looks_like_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def state_dict_from_checkpoint(obj: Any) -> collections.OrderedDict[str, np.ndarray]:
    """The model's state dict, keyed by mmseg names, floats as C-contiguous float32.

    Accepts what :func:`load_pth` returns for an mmcv checkpoint (``{'meta', 'state_dict',
    'optimizer'?}``, an optional DDP ``module.`` prefix is stripped per key as mmcv does), an
    official Segmenter checkpoint (``{'model': {'encoder.*', 'decoder.*'}, ...}``, renamed by
    :func:`segmenter_to_mmseg`), or a bare state dict in either layout. Non-float entries
    (integer buffers) keep their dtype.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"not a checkpoint: a {type(obj).__name__}, expected a dict")
    if "state_dict" in obj:
        sd = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
    elif _looks_like_state_dict(obj):
        sd = obj
    else:
        found = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(
            f"not a model checkpoint: no 'state_dict' or 'model' entry (found keys: {found})"
        )
    if not _looks_like_state_dict(sd):
        raise CheckpointError("the checkpoint's state dict is empty or holds non-tensor entries")
    sd = collections.OrderedDict(
        (k[len("module.") :] if k.startswith("module.") else k, v) for k, v in sd.items()
    )
    if any(k.startswith(("encoder.", "decoder.")) for k in sd):
        sd = segmenter_to_mmseg(sd)
    return collections.OrderedDict((k, _as_float32(k, v)) for k, v in sd.items())
