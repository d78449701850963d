"""Class pixel frequencies of a training split and the inverse-frequency class weights.

`loss.class_weight='inverse_frequency'` needs one pass over every training label. That pass
runs once: its result is cached beside the dataset, in `<root>/.rankseg_cache/`, under a key
that hashes the label files' bytes (and the label definition: classes, ignore value, zero
reduction, palette), so a second run reads the cache, and any edit to a label, added or
removed file, or changed class list computes them again.

Weights (sklearn's "balanced" rule): w_c = N / (C_present · n_c), with n_c the pixels of class
c, N = Σ n_c and C_present the number of classes with n_c > 0. The pixel-weighted mean of the
weights is 1 (Σ_c (n_c / N) · w_c = 1), so the weighted loss keeps the unweighted loss's
scale. A class absent from the training labels gets weight 0: no training pixel carries it,
so its weight never enters a pixel loss.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rankseg_jax.data import imageio
from rankseg_jax.errors import DatasetError

CACHE_DIRNAME = ".rankseg_cache"
CACHE_VERSION = 1


@dataclasses.dataclass
class ClassWeights:
    """weights (n_cls,) float64, counts (n_cls,) int64 pixels per class, the cache file and
    whether this call read it (True) or computed the statistics (False)."""

    weights: np.ndarray
    counts: np.ndarray
    cache_path: str | None
    from_cache: bool


def inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """(n_cls,) pixel counts → (n_cls,) float64 weights N / (C_present · n_c), 0 where n_c = 0."""
    counts = np.asarray(counts, np.int64)
    present = counts > 0
    if not present.any():
        raise DatasetError("no labelled pixel in the training labels: cannot weight classes")
    total = float(counts.sum())
    weights = np.zeros(counts.shape, np.float64)
    weights[present] = total / (present.sum() * counts[present].astype(np.float64))
    return weights


def _label_definition(source: Any) -> dict[str, Any]:
    palette = getattr(source, "palette", None)
    ignore_color = getattr(source, "ignore_color", None)
    return {
        "dataset": getattr(source, "dataset", type(source).__name__),
        "n_cls": int(source.n_cls),
        "ignore_index": int(source.ignore_index),
        "reduce_zero_label": bool(getattr(source, "reduce_zero_label", False)),
        "class_names": [str(n) for n in getattr(source, "class_names", ())],
        "palette": None if palette is None else np.asarray(palette).tolist(),
        "ignore_color": None if ignore_color is None else list(ignore_color),
    }


def _label_paths(source: Any) -> list[str] | None:
    if not hasattr(source, "paths"):
        return None
    return [source.paths(i)[1] for i in range(len(source))]


def content_key(source: Any, progress: bool = True) -> str:
    """sha256 hex of the label definition and every label file's name and bytes, in order.

    A source without label files (`paths`) is hashed by its decoded labels instead.
    """
    digest = hashlib.sha256(json.dumps(_label_definition(source), sort_keys=True).encode())
    paths = _label_paths(source)
    items = range(len(source))
    bar = tqdm(items, desc="hash labels", unit="file", disable=not progress, file=sys.stderr)
    for i in bar:
        if paths is not None:
            digest.update(os.path.basename(paths[i]).encode() + b"\0")
            digest.update(imageio.read_bytes(paths[i], "label"))
        else:
            label = np.ascontiguousarray(source[i]["label"])
            digest.update(str(label.shape).encode() + label.tobytes())
    return digest.hexdigest()


def read_label(source: Any, index: int) -> np.ndarray:
    """The (H, W) class-id label of example `index`, without decoding the image if possible."""
    if hasattr(source, "load_label"):
        return source.load_label(index)
    if hasattr(source, "paths") and hasattr(source, "convert_label"):
        path = source.paths(index)[1]
        raw, mode = imageio.read_label(path)
        source._check_mode(raw, mode, path)
        return source.convert_label(raw, path)
    return np.asarray(source[index]["label"])


def class_pixel_counts(source: Any, progress: bool = True) -> np.ndarray:
    """(n_cls,) int64 pixels per class over every label of `source` (ignore not counted)."""
    n_cls = int(source.n_cls)
    counts = np.zeros(n_cls, np.int64)
    bar = tqdm(range(len(source)), desc="class frequencies", unit="label",
               disable=not progress, file=sys.stderr)  # fmt: skip
    for i in bar:
        label = np.asarray(read_label(source, i)).ravel()
        label = label[(label >= 0) & (label < n_cls)]
        counts += np.bincount(label, minlength=n_cls).astype(np.int64)
    return counts


def cache_path_for(source: Any, key: str, cache_dir: str | os.PathLike | None = None) -> str:
    """`<cache_dir or root/.rankseg_cache>/class_weights-<split>-<key[:16]>.json`."""
    folder = os.fspath(cache_dir) if cache_dir else os.path.join(source.root, CACHE_DIRNAME)
    split = str(getattr(source, "split", "train")).replace("/", "_")
    return os.path.join(folder, f"class_weights-{split}-{key[:16]}.json")


def _read_cache(path: str, key: str, n_cls: int) -> np.ndarray | None:
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # a damaged cache is recomputed and rewritten
    if entry.get("key") != key or entry.get("version") != CACHE_VERSION:
        return None
    counts = np.asarray(entry.get("counts", []), np.int64)
    return counts if counts.shape == (n_cls,) else None


def _write_cache(path: str, key: str, source: Any, counts: np.ndarray) -> str | None:
    entry = {
        "version": CACHE_VERSION,
        "key": key,
        "definition": _label_definition(source),
        "num_labels": len(source),
        "counts": [int(c) for c in counts],
        "weights": [float(w) for w in inverse_frequency(counts)],
    }
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(entry, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        print(f"WARNING: cannot cache class weights at {path} ({e.strerror or e}); "
              "they will be computed again next run", file=sys.stderr)  # fmt: skip
        return None
    return path


def inverse_frequency_weights(
    source: Any, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> ClassWeights:
    """The inverse-frequency class weights of a training source, computed once and cached.

    `source` is a reader (len, [i], n_cls, ignore_index, root, split; `paths`/`load_label`
    make it cheaper). The labels' bytes are hashed (fast); on a cache hit nothing is decoded,
    otherwise every label is decoded once with a progress bar and the counts are cached.
    """
    key = content_key(source, progress)
    path = cache_path_for(source, key, cache_dir)
    counts = _read_cache(path, key, int(source.n_cls))
    if counts is not None:
        return ClassWeights(inverse_frequency(counts), counts, path, True)
    counts = class_pixel_counts(source, progress)
    written = _write_cache(path, key, source, counts)
    return ClassWeights(inverse_frequency(counts), counts, written, False)
