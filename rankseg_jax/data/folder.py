"""A user's own dataset: one folder of images and label masks, with the classes beside them.

Layout (data.root = DIR):

    DIR/classes.txt                 one class name per line, line order = class id
      or DIR/classes.json           {"classes": [...], "palette": [[r, g, b], ...],
                                     "ignore_color": [r, g, b]}   (palette/ignore_color optional)
    DIR/images/<split>/<stem>.jpg   any of IMAGE_SUFFIXES
    DIR/annotations/<split>/<stem>.png   any of LABEL_SUFFIXES, paired with the image by stem

Splits are folder names (`train` and `val` by default; any name works). Instead of a split
folder, a split list file (`split_list=`, a path relative to DIR or absolute) names one entry
per line: a stem relative to `images/` (`a001`, or `train/a001`), suffix optional; its label
is at the same relative path under `annotations/`.

Labels are either class-index files (8-bit "L" grayscale or "P" palette PNGs, whose indices
are read, not their colours; 16-bit for more than 255 classes) or colour-coded RGB(A) masks
mapped through the palette: colour palette[c] is class c, `ignore_color` is ignore, any other
colour is an error naming the file and the colour. For index labels, `reduce_zero_label`
works as mmseg's (file value 0 = ignore, value k = class k − 1; the classes file then lists the
classes of values 1..n); `ignore_index` is the ignore value (255 by default).

Class names and palette come from the config (`classes=`, `palette=`) or the classes file;
without a palette a generated one draws the classes (colour masks then need one). Every check
of the built-in readers applies, each a one-line `DatasetError` naming the file.

`FolderSource` keeps the reader interface (`len`, `[i]` → {"image", "label", "name"},
`check_layout()`, `n_cls`, `ignore_index`, `class_names`, `palette`), with the label
definition on the instance instead of the class.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rankseg_jax.data import imageio
from rankseg_jax.data.base import SegmentationSource
from rankseg_jax.data.palette import generic_palette
from rankseg_jax.errors import CorruptDataError, DatasetError, DatasetNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG", ".webp")
CLASSES_TXT = "classes.txt"
CLASSES_JSON = "classes.json"
DEFAULT_IGNORE_INDEX = 255
INDEX_MODES = ("L", "P")
INDEX16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
COLOR_MODES = ("RGB", "RGBA")
EXPECTED_TREE = (
    "DIR/{classes.txt|classes.json, images/<split>/<stem>.jpg, annotations/<split>/<stem>.png}"
)


def _rgb_list(value: Any, where: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2 or array.shape[1] != 3 or array.dtype.kind not in "iu":
        raise DatasetError(f"{where}: palette must be a list of [r, g, b] integer triples")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DatasetError(f"{where}: palette values must be in 0..255")
    return array.astype(np.uint8)


def read_classes(
    root: str | os.PathLike,
) -> tuple[tuple[str, ...], np.ndarray | None, tuple[int, int, int] | None, str]:
    """(names, palette (n, 3) uint8 or None, ignore colour or None, file) of a dataset folder.

    classes.txt: one name per non-empty line. classes.json: {"classes": [names],
    "palette": [[r, g, b], ...], "ignore_color": [r, g, b]} or a list of {"name", "color"}.
    Raises DatasetError (missing, both present, empty, duplicate names, bad palette).
    """
    txt = os.path.join(root, CLASSES_TXT)
    js = os.path.join(root, CLASSES_JSON)
    if os.path.isfile(txt) and os.path.isfile(js):
        raise DatasetError(f"{root}: both {CLASSES_TXT} and {CLASSES_JSON}; keep one")
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            names = tuple(line.strip() for line in f if line.strip())
        return _check_names(names, txt), None, None, txt
    if not os.path.isfile(js):
        raise DatasetError(
            f"{root}: no {CLASSES_TXT} or {CLASSES_JSON} (one class name per line, line order = "
            "class id), and no classes in the config (data.classes)"
        )
    try:
        with open(js, encoding="utf-8") as f:
            spec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{js}: not valid JSON ({e})") from None
    palette = ignore = None
    if isinstance(spec, list):
        if not all(isinstance(e, dict) and "name" in e for e in spec):
            raise DatasetError(f'{js}: a list must hold {{"name": ..., "color": [r, g, b]}}')
        names = tuple(str(e["name"]) for e in spec)
        if any("color" in e for e in spec):
            if not all("color" in e for e in spec):
                raise DatasetError(f"{js}: either every class has a color or none")
            palette = _rgb_list([e["color"] for e in spec], js)
    elif isinstance(spec, dict) and isinstance(spec.get("classes"), list):
        names = tuple(str(n) for n in spec["classes"])
        if spec.get("palette") is not None:
            palette = _rgb_list(spec["palette"], js)
        if spec.get("ignore_color") is not None:
            ignore = tuple(int(v) for v in _rgb_list([spec["ignore_color"]], js)[0])
    else:
        raise DatasetError(f'{js}: expected {{"classes": [...], "palette": [...]}}')
    return _check_names(names, js), palette, ignore, js


def _check_names(names: Sequence[str], where: str) -> tuple[str, ...]:
    names = tuple(str(n).strip() for n in names)
    if not names:
        raise DatasetError(f"{where}: no class names")
    if any(not n for n in names):
        raise DatasetError(f"{where}: empty class name")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DatasetError(f"{where}: class name {n!r} appears twice")
        seen.add(n)
    return names


def _color_key(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 → (...) int64 key r·2¹⁶ + g·2⁸ + b."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class FolderSource(SegmentationSource):
    """A dataset folder with the user's classes (see the module docstring for the layout).

    FolderSource(root, split, *, classes=None, palette=None, ignore_color=None,
                 reduce_zero_label=False, ignore_index=255, split_list=None,
                 validate_labels=True)

    `classes` / `palette` from the config override the classes file (`palette` may be given
    alone to colour the file's classes). Raises DatasetNotFoundError for a missing root or
    split folder / list, DatasetError for bad classes, DatasetError for ambiguous
    pairing.
    """

    dataset = "folder"
    expected_tree = EXPECTED_TREE
    # What the recipes put in data.* (the label definition itself lives on the instance).
    mean, std = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)  # the AugReg ViT backbones'
    default_root = ""
    train_split, val_split = "train", "val"
    ignore_index = DEFAULT_IGNORE_INDEX

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        classes: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | np.ndarray | None = None,
        ignore_color: Sequence[int] | None = None,
        reduce_zero_label: bool = False,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        split_list: str | os.PathLike | None = None,
        validate_labels: bool = True,
    ) -> None:
        self.config_root = str(root)
        self.root = self._resolve_root(str(root))
        self.split = str(split)
        self.reduce_zero_label = bool(reduce_zero_label)
        self.ignore_index = int(ignore_index)
        self.validate_labels = validate_labels
        self._load_classes(classes, palette, ignore_color)
        self.label_bits = 16  # index labels may be 8- or 16-bit files: a 2^16-entry LUT
        if self.ignore_index < 0:
            raise DatasetError(f"{self.root}: data.ignore_index={self.ignore_index} is < 0")
        if 0 <= self.ignore_index < self.n_cls:
            raise DatasetError(
                f"{self.classes_source}: data.ignore_index={self.ignore_index} is one of the "
                f"{self.n_cls} class ids; use a value ≥ n_cls (255 by default)"
            )
        if split_list is not None:
            list_path = os.path.join(self.root, os.fspath(split_list))
            self.image_dir = os.path.join(self.root, "images")
            self.label_dir = os.path.join(self.root, "annotations")
            self.list_path: str | None = list_path
        else:
            self.image_dir = os.path.join(self.root, "images", self.split)
            self.label_dir = os.path.join(self.root, "annotations", self.split)
            self.list_path = None
        self._require_dir(self.image_dir, "image folder")
        self._require_dir(self.label_dir, "label folder")
        self._images = self._index(self.image_dir, IMAGE_SUFFIXES, "image")
        self._labels = self._index(self.label_dir, LABEL_SUFFIXES, "label")
        self.stems = self._list_stems()
        self._lut = self._label_lut()

    # ---------------------------------------------------------------------------- classes
    def _load_classes(self, classes, palette, ignore_color) -> None:
        file_palette = file_ignore = None
        if classes is not None:
            names = _check_names(list(classes), "data.classes")
            self.classes_source = "data.classes"
        else:
            names, file_palette, file_ignore, self.classes_source = read_classes(self.root)
        self.class_names = names
        self.n_cls = len(names)
        if palette is not None:
            chosen, where = _rgb_list(palette, "data.palette"), "data.palette"
        else:
            chosen, where = file_palette, self.classes_source
        if chosen is not None and len(chosen) != self.n_cls:
            raise DatasetError(
                f"{where}: palette has {len(chosen)} colours for {self.n_cls} classes"
            )
        self.has_palette = chosen is not None
        if chosen is None:
            chosen = generic_palette(self.n_cls)
        self.palette = np.asarray(chosen, np.uint8)
        ignore = ignore_color if ignore_color is not None else file_ignore
        self.ignore_color = None if ignore is None else tuple(int(v) for v in ignore)
        if self.has_palette:
            keys = _color_key(self.palette)
            uniq, counts = np.unique(keys, return_counts=True)
            if (counts > 1).any():
                dup = int(np.flatnonzero(keys == uniq[counts > 1][0])[1])
                raise DatasetError(
                    f"{where}: colour {tuple(int(v) for v in self.palette[dup])} is used by two "
                    "classes, so colour masks would be ambiguous"
                )
            if self.ignore_color is not None and int(
                _color_key(np.array(self.ignore_color))
            ) in set(keys.tolist()):
                raise DatasetError(f"{where}: ignore_color {self.ignore_color} is a class colour")

    def definition(self) -> dict[str, Any]:
        """The label definition as JSON-ready data: what a prepared (TFDS) copy, an exported
        model or a cache key must carry, since it lives on the instance, not the class."""
        return {
            "dataset": self.dataset,
            "n_cls": self.n_cls,
            "class_names": list(self.class_names),
            "palette": self.palette.tolist(),
            "has_palette": self.has_palette,
            "ignore_index": self.ignore_index,
            "ignore_color": None if self.ignore_color is None else list(self.ignore_color),
            "reduce_zero_label": self.reduce_zero_label,
            "label_dtype": "uint8" if max(self.n_cls, self.ignore_index) <= 255 else "uint16",
        }

    # ----------------------------------------------------------------------------- layout
    def _resolve_root(self, root: str) -> str:
        path = os.path.abspath(root)
        if not os.path.isdir(path):
            raise DatasetNotFoundError(
                f"folder dataset root not found: looked in {path} (config key data.root="
                f"{root!r}; expected {EXPECTED_TREE})"
            )
        if not os.path.isdir(os.path.join(path, "images")):
            raise DatasetNotFoundError(
                f"{path}: not a dataset folder, 'images' not found in it (config key data.root="
                f"{root!r}; expected {EXPECTED_TREE})"
            )
        return path

    def _index(self, folder: str, suffixes: tuple[str, ...], what: str) -> dict[str, str]:
        """{stem relative to `folder` (posix) → file name relative to it}; one level for a split
        folder, recursive under a split list's images/annotations."""
        found: dict[str, str] = {}
        if self.list_path is None:
            entries = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))]
        else:
            entries = []
            for base, _, files in os.walk(folder):
                rel = os.path.relpath(base, folder)
                entries += [n if rel == "." else os.path.join(rel, n) for n in files]
        for name in sorted(entries):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in suffixes:
                continue
            stem = stem.replace(os.sep, "/")
            if stem in found:
                raise DatasetError(
                    f"{os.path.join(folder, name)}: two {what} files with stem {stem!r} "
                    f"({found[stem]} and {name}); keep one"
                )
            found[stem] = name
        return found

    def _list_stems(self) -> list[str]:
        if self.list_path is None:
            return sorted(self._images)
        if not os.path.isfile(self.list_path):
            raise DatasetNotFoundError(
                f"{self.list_path}: split list for {self.split!r} not found (config key "
                "data.split_list, relative to data.root)"
            )
        with open(self.list_path, encoding="utf-8") as f:
            entries = [line.strip().replace("\\", "/") for line in f if line.strip()]
        stems = []
        for entry in entries:
            stem, suffix = os.path.splitext(entry)
            stems.append(stem if suffix.lower() in IMAGE_SUFFIXES else entry)
        return stems

    def check_layout(self) -> None:
        """Pairing from directory listings only: an empty split, listed images that do not
        exist, and images without a label each raise one line naming the file."""
        if not self.stems:
            where = self.list_path or self.image_dir
            raise DatasetNotFoundError(
                f"{where}: no images in split {self.split!r} (looked for "
                f"{', '.join(IMAGE_SUFFIXES)}; expected {EXPECTED_TREE})"
            )
        absent = [s for s in self.stems if s not in self._images]
        if absent:
            raise DatasetNotFoundError(
                f"{self.list_path}: {len(absent)} listed image(s) not found in "
                f"{self.image_dir}, first {absent[0]!r}"
            )
        missing = [s for s in self.stems if s not in self._labels]
        if missing:
            image = os.path.join(self.image_dir, self._images[missing[0]])
            lossy = [
                f"{missing[0]}{suffix}"
                for suffix in LOSSY_SUFFIXES
                if os.path.isfile(os.path.join(self.label_dir, missing[0] + suffix))
            ]
            hint = (
                f"; found {lossy[0]}, but labels must be lossless (PNG/BMP/TIFF): JPEG changes "
                "the class values"
                if lossy
                else ""
            )
            raise DatasetNotFoundError(
                f"{image}: image without label, no {missing[0]}{{{','.join(LABEL_SUFFIXES)}}} in "
                f"{self.label_dir} ({len(missing)} of {len(self.stems)} images in split "
                f"{self.split!r} have no label){hint}"
            )

    def paths(self, index: int) -> tuple[str, str]:
        """(image path, label path) of example `index` (the label path may not exist)."""
        stem = self.stems[index]
        image = self._images.get(stem, stem + ".jpg")
        label = self._labels.get(stem, stem + ".png")
        return os.path.join(self.image_dir, image), os.path.join(self.label_dir, label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"image": (H, W, 3) uint8 RGB, "label": (H, W) int32, "name": stem}."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"folder {self.split}: index {index} out of {len(self)}")
        stem = self.stems[index]
        image_path, label_path = self.paths(index)
        if stem not in self._images:
            raise DatasetNotFoundError(f"{image_path}: image file not found")
        if stem not in self._labels:
            raise DatasetNotFoundError(f"{image_path}: image without label in {self.label_dir}")
        image = imageio.read_image(image_path)
        raw, mode = imageio.read_label(label_path)
        self._check_mode(raw, mode, label_path)
        _check_size(raw.shape[:2], image.shape[:2], label_path, image_path)
        return {"image": image, "label": self.convert_label(raw, label_path), "name": stem}

    def check_examples(self, progress: bool = True, skip_corrupt: bool = False) -> None:
        """Every label decoded and checked (mode, values or colours, size against the image's
        header) before anything is built, so a bad mask stops a run in seconds, not after the
        model compiled. Images are not decoded (their size is read from the file header, EXIF
        rotation applied as OpenCV does). Raises the reader's one-line DatasetError for the
        first bad example; unreadable files are left to the pipeline with `skip_corrupt`."""
        bar = tqdm(range(len(self)), desc=f"check labels ({self.split})", unit="label",
                   disable=not progress, file=sys.stderr)  # fmt: skip
        for index in bar:
            image_path, label_path = self.paths(index)
            try:
                raw, mode = imageio.read_label(label_path)
            except CorruptDataError:
                if skip_corrupt:
                    continue
                raise
            self._check_mode(raw, mode, label_path)
            size = _header_size(image_path)
            if size is not None:
                _check_size(raw.shape[:2], size, label_path, image_path)
            self.convert_label(raw, label_path)

    def load_label(self, index: int) -> np.ndarray:
        """The (H, W) int32 class-id label of example `index` alone (no image decoded)."""
        _, label_path = self.paths(int(index))
        raw, mode = imageio.read_label(label_path)
        self._check_mode(raw, mode, label_path)
        return self.convert_label(raw, label_path)

    # ----------------------------------------------------------------------------- labels
    def _check_mode(self, raw: np.ndarray, mode: str, path: str) -> None:
        if mode in COLOR_MODES and raw.ndim == 3:
            if not self.has_palette:
                raise DatasetError(
                    f"{path}: colour-coded {mode} label but no palette to map colours to classes "
                    f"(give a palette in {CLASSES_JSON} or data.palette, or store class-index PNGs)"
                )
            if self.reduce_zero_label:
                raise DatasetError(
                    f"{path}: colour-coded {mode} label with data.reduce_zero_label=True; "
                    "reduce_zero_label applies to class-index labels (colour masks mark ignored "
                    f"pixels with ignore_color in {CLASSES_JSON})"
                )
            return
        if raw.ndim == 2 and (mode in INDEX_MODES or mode in INDEX16_MODES):
            return
        raise DatasetError(
            f"{path}: label has mode {mode} with shape {raw.shape}; folder labels are class-index "
            "PNGs (8-bit L or P, 16-bit I;16) or RGB colour masks with a palette"
        )

    def convert_label(self, raw: np.ndarray, path: str = "<label>") -> np.ndarray:
        """Raw label (H, W) values or (H, W, 3|4) colours → int32 class ids / ignore_index."""
        raw = np.asarray(raw)
        if raw.ndim == 3:
            return self._convert_colors(raw[..., :3], path)
        return super().convert_label(raw, path)

    def _convert_colors(self, rgb: np.ndarray, path: str) -> np.ndarray:
        keys = _color_key(rgb)
        palette_keys = _color_key(self.palette)
        order = np.argsort(palette_keys)
        sorted_keys = palette_keys[order]
        pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
        hit = sorted_keys[pos] == keys
        label = np.where(hit, order[pos], -1).astype(np.int32)
        if self.ignore_color is not None:
            label[keys == int(_color_key(np.array(self.ignore_color)))] = self.ignore_index
        if label.size and label.min() < 0:
            bad = np.unique(keys[label < 0])
            colors = [((int(k) >> 16) & 255, (int(k) >> 8) & 255, int(k) & 255) for k in bad]
            first = np.argwhere(label < 0)[0]
            if self.validate_labels:
                raise DatasetError(
                    f"{path}: colour {colors[0]} at pixel (row {first[0]}, col {first[1]}) is no "
                    f"class of the palette ({len(colors)} unknown colour(s)"
                    + (f": {', '.join(map(str, colors[:4]))}" if len(colors) > 1 else "")
                    + f"; palette from {self.classes_source})"
                )
            label = np.where(label < 0, self.ignore_index, label).astype(np.int32)
        return label

    def allowed_raw_values(self) -> str:
        lo, hi = (1, self.n_cls) if self.reduce_zero_label else (0, self.n_cls - 1)
        zero = "0 = ignore, " if self.reduce_zero_label else ""
        return (
            f"{zero}{lo}..{hi} = the classes of {self.classes_source}, {self.ignore_index} = ignore"
        )


def _check_size(label_hw: tuple, image_hw: tuple, label_path: str, image_path: str) -> None:
    if tuple(label_hw) != tuple(image_hw):
        transposed = tuple(label_hw) == tuple(image_hw)[::-1]
        hint = "; the sizes are transposed (an EXIF orientation tag?)" if transposed else ""
        raise DatasetError(
            f"{label_path}: label size {label_hw[0]}x{label_hw[1]} (HxW) differs from "
            f"image size {image_hw[0]}x{image_hw[1]} (HxW) of {image_path}{hint}"
        )


EXIF_ORIENTATION = 0x0112
EXIF_TRANSPOSING = (5, 6, 7, 8)  # orientations that swap height and width


def _header_size(path: str) -> tuple[int, int] | None:
    """(H, W) of an image as OpenCV's IMREAD_COLOR decodes it, from the header only; None when
    Pillow cannot read the header (the pipeline then reports the file)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError):
        return None
    return (w, h) if orientation in EXIF_TRANSPOSING else (h, w)


def folder_labels(
    root: str | os.PathLike,
    classes: Sequence[str] | None = None,
    palette: Sequence[Sequence[int]] | np.ndarray | None = None,
    ignore_color: Sequence[int] | None = None,
) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, (n_cls, 3) uint8 palette) of a folder dataset without listing a split.

    The same rules and checks as `FolderSource` (config `classes`/`palette` override the
    classes file); the root must exist only when the names come from its classes file.
    Raises DatasetNotFoundError / DatasetError with one line naming the file or key.
    """
    probe = FolderSource.__new__(FolderSource)
    probe.root = str(root) if classes is not None else probe._resolve_root(str(root))
    probe._load_classes(classes, palette, ignore_color)
    return probe.class_names, probe.palette


def available_splits(root: str | os.PathLike) -> list[str]:
    """The split folder names under `<root>/images` that also exist under `annotations`."""
    images = os.path.join(os.fspath(root), "images")
    labels = os.path.join(os.fspath(root), "annotations")
    if not os.path.isdir(images):
        raise DatasetNotFoundError(f"{images}: not found (expected {EXPECTED_TREE})")
    return sorted(
        n
        for n in os.listdir(images)
        if os.path.isdir(os.path.join(images, n)) and os.path.isdir(os.path.join(labels, n))
    )
