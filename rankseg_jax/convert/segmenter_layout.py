"""The two PyTorch state-dict layouts of a Segmenter and the mapping between them.

mmseg's (`backbone.*`, `decode_head.*`, what the RankSeg code and our exports use) and the
official rstrudel/segmenter one (`encoder.*`, `decoder.*`, plus an unused 1000-way
`encoder.head`). The pickle file format itself is rankseg_jax.convert.torch_pickle.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from rankseg_jax.errors import CheckpointError

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
