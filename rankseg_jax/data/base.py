"""The random-access dataset interface every reader implements, and the errors it raises.

A source is what grain's `MapDataset.source` wants: `len(source)` and `source[i]` returning

    {"image": uint8 (H, W, 3) RGB, "label": int32 (H, W), "name": str}

where the label holds class ids 0..n_cls-1 and `ignore_index` for pixels that are not scored.
Each source also carries `n_cls`, `ignore_index`, `class_names` (n_cls str), `palette`
((n_cls, 3) uint8, the colours the community uses to draw the classes) and `check_layout()`,
which validates folders and image/label pairing cheaply before training starts. Problems with
one example (unreadable image, wrong label mode, sizes that differ, label values outside the
classes) raise a `DatasetError` when that example is read, so a pipeline can stop on it or skip
and count it, never pass a wrong batch on.

Sources are plain picklable objects (paths as strings), so grain worker processes can copy them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from rankseg_jax.data import imageio
from rankseg_jax.errors import DatasetError, DatasetNotFoundError

README_HINT = (
    "see data/README.md for how to obtain and place each dataset, "
    "or run configs/demo.py, which generates its data and needs no download"
)


def _fmt_values(values: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} values)" if len(values) > limit else "")


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]} (HxW)"


class SegmentationSource:
    """A segmentation dataset on disk: image folder + label folder + the list of example stems.

    Subclasses describe the layout with class attributes and `_split_paths`; this class lists
    the examples, pairs them, decodes, converts raw label values to class ids and checks them.

    Class attributes a subclass sets:
      dataset: the name used by `make_source` and in messages.
      n_cls, ignore_index, reduce_zero_label, class_names, palette: the label definition
        (ignore_index and reduce_zero_label are defaults that `data.*` may override).
      mean, std: the normalisation the reference trains with (RGB, on 8-bit pixel values).
      default_root, train_split, val_split: what the recipes put in `data.*`.
      label_bits: 8 (labels are "L"/"P" PNGs) or 16 (labels are "I;16" files).
      image_suffix, label_suffix: file name endings after the stem.
      root_marker: a path inside a valid root; used to recognise the root.
      root_dirname: the folder a user may have pointed one level above (e.g.
        "ADEChallengeData2016"); the reader descends into it when the marker is there.
      split_aliases: other accepted names for each split (e.g. "train" for "training").
      expected_tree: a one-line layout reminder for messages.
    """

    dataset: ClassVar[str] = ""
    n_cls: ClassVar[int] = 0
    ignore_index: ClassVar[int] = 0
    reduce_zero_label: ClassVar[bool] = False
    class_names: ClassVar[tuple[str, ...]] = ()
    palette: ClassVar[np.ndarray] = np.zeros((0, 3), np.uint8)
    mean: ClassVar[tuple[float, ...]] = (0.0, 0.0, 0.0)
    std: ClassVar[tuple[float, ...]] = (1.0, 1.0, 1.0)
    default_root: ClassVar[str] = ""
    train_split: ClassVar[str] = ""
    val_split: ClassVar[str] = ""
    label_bits: ClassVar[int] = 8
    image_suffix: ClassVar[str] = ".jpg"
    label_suffix: ClassVar[str] = ".png"
    root_marker: ClassVar[str] = ""
    root_dirname: ClassVar[str] = ""
    split_aliases: ClassVar[dict[str, tuple[str, ...]]] = {}
    expected_tree: ClassVar[str] = ""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        validate_labels: bool = True,
        reduce_zero_label: bool | None = None,
        ignore_index: int | None = None,
    ):
        """Find the root and the split, and list the split's examples (sorted by stem).

        Raises DatasetNotFoundError for a missing root, split folder or split list.
        `validate_labels=False` skips the per-example label value check (not recommended).
        `reduce_zero_label` / `ignore_index` (the config's `data.*`) override the dataset's
        label conversion; None keeps the dataset's own.
        """
        if reduce_zero_label is not None:
            self.reduce_zero_label = bool(reduce_zero_label)
        if ignore_index is not None:
            self.ignore_index = int(ignore_index)
        self.config_root = str(root)
        self.root = self._resolve_root(str(root))
        self.split = self.canonical_split(split, self.root)
        self.image_dir, self.label_dir, self.list_path = self._split_paths(self.split)
        self.validate_labels = validate_labels
        self._require_dir(self.image_dir, "image folder")
        self._require_dir(self.label_dir, "label folder")
        self.stems = self._list_stems()
        self._lut = self._label_lut()

    # ----------------------------------------------------------------------------- layout
    def _split_paths(self, split: str) -> tuple[str, str, str | None]:
        """(image folder, label folder, split list file or None) for a canonical split name."""
        raise NotImplementedError

    def _resolve_root(self, root: str) -> str:
        path = os.path.abspath(root)
        if not os.path.isdir(path):
            raise DatasetNotFoundError(
                f"{self.dataset} dataset root not found: looked in {path} (config key data.root="
                f"{root!r}, relative to the working directory); {README_HINT}"
            )
        if os.path.exists(os.path.join(path, self.root_marker)):
            return path
        nested = os.path.join(path, self.root_dirname)
        if self.root_dirname and os.path.exists(os.path.join(nested, self.root_marker)):
            return nested
        raise DatasetNotFoundError(
            f"{path}: not a {self.dataset} root, {self.root_marker!r} not found in it "
            f"(config key data.root={root!r}; expected {self.expected_tree}); {README_HINT}"
        )

    @classmethod
    def canonical_split(cls, split: str, where: str = "") -> str:
        """The split's canonical name for `split` or one of its aliases ("val" → ...)."""
        for name, aliases in cls.split_aliases.items():
            if split == name or split in aliases:
                return name
        known = ", ".join(cls.split_aliases)
        prefix = f"{where}: " if where else ""
        raise DatasetNotFoundError(
            f"{prefix}unknown {cls.dataset} split {split!r} (known splits: {known})"
        )

    def _require_dir(self, path: str, what: str) -> None:
        if not os.path.isdir(path):
            raise DatasetNotFoundError(
                f"{path}: {self.dataset} {what} for split {self.split!r} not found "
                f"(expected {self.expected_tree})"
            )

    def _list_stems(self) -> list[str]:
        if self.list_path is not None:
            if not os.path.isfile(self.list_path):
                raise DatasetNotFoundError(
                    f"{self.list_path}: {self.dataset} split list for {self.split!r} not found "
                    f"(expected {self.expected_tree})"
                )
            with open(self.list_path, encoding="utf-8") as f:
                stems = [line.strip() for line in f if line.strip()]
            return [os.path.splitext(s)[0] if s.endswith(self.image_suffix) else s for s in stems]
        suffix = self.image_suffix
        return sorted(n[: -len(suffix)] for n in os.listdir(self.image_dir) if n.endswith(suffix))

    def check_layout(self) -> None:
        """Check folders and pairing cheaply (directory listings only; no file is decoded).

        Raises DatasetNotFoundError when the split has no images or its list names images that
        do not exist, and DatasetNotFoundError for images without a label file.
        """
        if not self.stems:
            where = self.list_path or self.image_dir
            raise DatasetNotFoundError(
                f"{where}: no {self.image_suffix} images in {self.dataset} split {self.split!r} "
                f"(expected {self.expected_tree})"
            )
        if self.list_path is not None:
            images = set(os.listdir(self.image_dir))
            absent = [s for s in self.stems if s + self.image_suffix not in images]
            if absent:
                raise DatasetNotFoundError(
                    f"{self.list_path}: {len(absent)} listed image(s) not found in "
                    f"{self.image_dir}, first {absent[0] + self.image_suffix}"
                )
        labels = set(os.listdir(self.label_dir))
        missing = [s for s in self.stems if s + self.label_suffix not in labels]
        if missing:
            image, label = self.paths(self.stems.index(missing[0]))
            raise DatasetNotFoundError(
                f"{image}: image without label, {label} not found ({len(missing)} of "
                f"{len(self.stems)} images in split {self.split!r} have no label)"
            )

    # --------------------------------------------------------------------------- examples
    def __len__(self) -> int:
        return len(self.stems)

    def paths(self, index: int) -> tuple[str, str]:
        """(image path, label path) of example `index`."""
        stem = self.stems[index]
        return (
            os.path.join(self.image_dir, stem + self.image_suffix),
            os.path.join(self.label_dir, stem + self.label_suffix),
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"image": (H, W, 3) uint8 RGB, "label": (H, W) int32, "name": stem}."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.dataset} {self.split}: index {index} out of {len(self)}")
        image_path, label_path = self.paths(index)
        if not os.path.exists(label_path) and os.path.exists(image_path):
            raise DatasetNotFoundError(f"{image_path}: image without label, {label_path} not found")
        image = imageio.read_image(image_path)
        raw, mode = imageio.read_label(label_path)
        self._check_mode(raw, mode, label_path)
        if raw.shape != image.shape[:2]:
            transposed = raw.shape == image.shape[1::-1]
            hint = (
                "; the sizes are transposed, so an EXIF orientation tag probably rotates one "
                "of the files (see data/README.md)"
                if transposed
                else ""
            )
            raise DatasetError(
                f"{label_path}: label size {_hw(raw.shape)} differs from image size "
                f"{_hw(image.shape)} of {image_path}{hint}"
            )
        label = self.convert_label(raw, label_path)
        return {"image": image, "label": label, "name": self.stems[index]}

    # ----------------------------------------------------------------------------- labels
    def _check_mode(self, raw: np.ndarray, mode: str, path: str) -> None:
        if self.label_bits == 8:
            ok, expected = mode in ("L", "P") and raw.dtype == np.uint8, "8-bit L or P"
        else:
            ok = mode in ("I;16", "I;16L", "I;16B", "I;16N", "I") and raw.ndim == 2
            expected = "16-bit I;16"
        if ok and raw.ndim == 2:
            return
        hint = ""
        if mode in ("RGB", "RGBA"):
            hint = (
                " (a colour label is a visualisation or an instance map, e.g. TFDS "
                "scene_parse150 / ADE annotations_instance; use the class-index label files)"
            )
        raise DatasetError(
            f"{path}: label has mode {mode} with shape {raw.shape}; {self.dataset} labels are "
            f"single-channel {expected} files{hint}"
        )

    def _label_lut(self) -> np.ndarray:
        """Raw label value → class id, ignore_index, or -1 for values outside the classes."""
        lut = np.full(1 << self.label_bits, -1, np.int32)
        if self.reduce_zero_label:
            # mmseg: 0 → ignore, k → k - 1, and a raw ignore value stays ignored.
            lut[1 : self.n_cls + 1] = np.arange(self.n_cls, dtype=np.int32)
            lut[0] = self.ignore_index
        else:
            lut[: self.n_cls] = np.arange(self.n_cls, dtype=np.int32)
        if self.ignore_index < lut.size:
            lut[self.ignore_index] = self.ignore_index
        return lut

    def allowed_raw_values(self) -> str:
        """The raw file values this dataset accepts, for messages."""
        lo, hi = (1, self.n_cls) if self.reduce_zero_label else (0, self.n_cls - 1)
        zero = "0 = ignore, " if self.reduce_zero_label else ""
        return f"{zero}{lo}..{hi} = classes, {self.ignore_index} = ignore"

    def convert_label(self, raw: np.ndarray, path: str = "<label>") -> np.ndarray:
        """Raw label values (H, W) → int32 class ids with `ignore_index`; bad values raise."""
        raw = np.asarray(raw)
        if raw.dtype.kind not in "ui":
            raise DatasetError(f"{path}: label values of dtype {raw.dtype}, not integers")
        if raw.size and (raw.min() < 0 or raw.max() >= len(self._lut)):
            bad = np.unique(raw[(raw < 0) | (raw >= len(self._lut))])
            raise DatasetError(
                f"{path}: label values outside the {self.n_cls} {self.dataset} classes: "
                f"{_fmt_values(list(bad))} (allowed raw values: {self.allowed_raw_values()})"
            )
        label = self._lut[raw]
        if self.validate_labels and label.size and label.min() < 0:
            bad = np.unique(raw[label < 0])
            raise DatasetError(
                f"{path}: label values outside the {self.n_cls} {self.dataset} classes: "
                f"{_fmt_values(list(bad))} (allowed raw values: {self.allowed_raw_values()})"
            )
        if not self.validate_labels:
            label = np.where(label < 0, self.ignore_index, label).astype(np.int32)
        return label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={getattr(self, 'root', None)!r}, "
            f"split={getattr(self, 'split', None)!r}, examples={len(getattr(self, 'stems', ()))}, "
            f"n_cls={self.n_cls}, ignore_index={self.ignore_index})"
        )
