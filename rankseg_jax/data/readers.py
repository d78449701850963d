"""The dataset readers and their registry: every dataset fact lives here, once.

Each reader class carries its label definition (n_cls, class names and palette from
`classes/<name>.txt`, ignore value, zero-label reduction), its normalisation (mean/std), its
default root and split names. Configs read them through `dataset_facts` (rankseg_jax.recipes);
`data.reduce_zero_label` / `data.ignore_index` override the reader's label conversion.

Layouts (data.root points at the first folder, or at the folder holding it):

* ade20k: ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png};
  uint8 labels 0 = other, 1..150 classes, reduced (0 → ignore 255, k → k - 1) as in mmseg.
  TFDS `scene_parse150` annotations are instance maps (RGB) and are rejected.
* synthetic_ade20k: the generated ADE20K-format dataset (rankseg_jax.data.synthetic).
* coco_stuff10k (mmseg's coco_stuff10k.py): images/{train2014,test2014}/*.jpg,
  annotations/.../*_labelTrainIds.png, optional imageLists/{train,test}.txt (selects and orders
  the examples; else every image sorted); labels 1..171 with 0 = unlabeled, reduced.
* coco_stuff164k (mmseg's coco_stuff164k.py): {images,annotations}/{train2017,val2017};
  labels 0..170 with 255 = ignore, NO reduction (0 is "person").
* pascal_context: VOC2010/{JPEGImages, SegmentationClassContext,
  ImageSets/SegmentationContext/{train,val}.txt}; 0 = background (a real class), 255 ignore.
* folder: the user's own dataset (rankseg_jax.data.folder): DIR/{classes.txt|classes.json,
  images/<split>/*, annotations/<split>/*}; its class count, names and palette are per
  instance (from the classes file or `data.classes` / `data.palette`), so code that needs
  them asks `dataset_labels(config.data)`, never the class.
* ade20k_full (MaskFormer's prepare_ade20k_full_sem_seg.py): ADE20K_2021_17_01/
  {images,annotations}_detectron2/{training,validation}/ADE_*.{jpg,tif}; uint16 labels 0..846
  with 65535 = ignore (255 is the real class "pier"). No community palette exists, so the
  palette is a fixed pseudo-random one (numpy PCG64 seeded with 847).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from typing import Any

import numpy as np

from rankseg_jax.data.base import SegmentationSource
from rankseg_jax.data.folder import FolderSource, folder_labels
from rankseg_jax.data.palette import generic_palette
from rankseg_jax.errors import ConfigError, DatasetError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
HALF = (127.5, 127.5, 127.5)


@functools.cache
def class_table(name: str) -> tuple[tuple[str, ...], np.ndarray | None]:
    """(class names, (n, 3) uint8 palette or None) from `classes/<name>.txt`.

    Each line is "R G B<TAB>name", or just "name" for a dataset without a palette.
    """
    text = importlib.resources.files("rankseg_jax.data").joinpath(f"classes/{name}.txt")
    rows = [line.split("\t") for line in text.read_text(encoding="utf-8").splitlines() if line]
    names = tuple(row[-1] for row in rows)
    if len(rows[0]) == 1:
        return names, None
    palette = np.array([[int(v) for v in row[0].split()] for row in rows], np.uint8)
    palette.setflags(write=False)
    return names, palette


def class_names_and_palette(dataset: str, n_cls: int) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, (n_cls, 3) uint8 palette) of `dataset` for a model with n_cls classes.

    The reader's when it has exactly n_cls classes; otherwise (a custom class count) the one
    fallback that export, predict and the pictures share: "class_<i>" and `generic_palette`.
    """
    reader = READERS.get(dataset)
    if reader is not None and reader.n_cls == n_cls:
        return tuple(reader.class_names), np.asarray(reader.palette, np.uint8)
    return tuple(f"class_{i}" for i in range(n_cls)), generic_palette(n_cls)


class ADE20K(SegmentationSource):
    """ADE20K-150: ADEChallengeData2016 images/annotations {training,validation}."""

    dataset = "ade20k"
    n_cls = 150
    ignore_index = 255
    reduce_zero_label = True
    class_names, palette = class_table("ade20k")
    mean, std = HALF, HALF
    default_root = "data/ade/ADEChallengeData2016"
    train_split, val_split = "training", "validation"
    root_marker = image_folder = "images"
    label_folder = "annotations"
    root_dirname = "ADEChallengeData2016"
    split_aliases = {"training": ("train",), "validation": ("val", "test")}
    expected_tree = (
        "ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*.{jpg,png}"
    )

    def _split_paths(self, split: str) -> tuple[str, str, None]:
        return (
            os.path.join(self.root, self.image_folder, split),
            os.path.join(self.root, self.label_folder, split),
            None,
        )


class SyntheticADE20K(ADE20K):
    """The generated ADE20K-format dataset (rankseg_jax.data.synthetic), read as ADE20K."""

    dataset = "synthetic_ade20k"
    default_root = "data/synthetic_ade/ADEChallengeData2016"


_LIST_DIRS = ("imageLists", "imagesLists", "imagelists")


class _COCOStuff(SegmentationSource):
    n_cls = 171
    ignore_index = 255
    class_names, palette = class_table("coco_stuff")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    label_suffix = "_labelTrainIds.png"
    root_marker = "images"

    def _split_folder(self, split: str) -> str:
        return split

    def _split_paths(self, split: str) -> tuple[str, str, str | None]:
        folder = self._split_folder(split)
        return (
            os.path.join(self.root, "images", folder),
            os.path.join(self.root, "annotations", folder),
            self._find_list(split),
        )

    def _find_list(self, split: str) -> str | None:
        return None


class COCOStuff10k(_COCOStuff):
    """COCO-Stuff10k: train2014 (9k) / test2014 (1k), labels 1..171 with 0 = unlabeled."""

    dataset = "coco_stuff10k"
    reduce_zero_label = True
    default_root = "data/coco_stuff10k"
    train_split, val_split = "train", "test"
    root_dirname = "coco_stuff10k"
    split_aliases = {"train": ("train2014", "training"), "test": ("test2014", "val", "validation")}
    expected_tree = (
        "coco_stuff10k/{images/{train2014,test2014}/*.jpg, "
        "annotations/{train2014,test2014}/*_labelTrainIds.png, imageLists/{train,test}.txt}"
    )

    def _split_folder(self, split: str) -> str:
        return f"{split}2014"

    def _find_list(self, split: str) -> str | None:
        for name in _LIST_DIRS:
            path = os.path.join(self.root, name, f"{split}.txt")
            if os.path.isfile(path):
                return path
        return None


class COCOStuff164k(_COCOStuff):
    """COCO-Stuff164k: train2017 / val2017, labels 0..170 with 255 = ignore (no reduction)."""

    dataset = "coco_stuff164k"
    reduce_zero_label = False
    default_root = "data/coco_stuff164k"
    train_split, val_split = "train2017", "val2017"
    root_dirname = "coco_stuff164k"
    split_aliases = {"train2017": ("train", "training"), "val2017": ("val", "validation")}
    expected_tree = (
        "coco_stuff164k/{images,annotations}/{train2017,val2017}/*{.jpg,_labelTrainIds.png}"
    )


class PascalContext(SegmentationSource):
    """Pascal-Context with 60 classes (background included), split lists from ImageSets."""

    dataset = "pascal_context"
    n_cls = 60
    ignore_index = 255
    reduce_zero_label = False
    class_names, palette = class_table("pascal_context")  # the first 60 ADE20K colours
    mean, std = HALF, HALF
    default_root = "data/VOCdevkit/VOC2010"
    train_split, val_split = "train", "val"
    root_marker = "JPEGImages"
    root_dirname = "VOC2010"
    split_aliases = {"train": ("training",), "val": ("validation", "test")}
    expected_tree = (
        "VOC2010/{JPEGImages/*.jpg, SegmentationClassContext/*.png, "
        "ImageSets/SegmentationContext/{train,val}.txt}"
    )

    def _split_paths(self, split: str) -> tuple[str, str, str]:
        return (
            os.path.join(self.root, "JPEGImages"),
            os.path.join(self.root, "SegmentationClassContext"),
            os.path.join(self.root, "ImageSets", "SegmentationContext", f"{split}.txt"),
        )


class ADE20KFull(ADE20K):
    """ADE20K-Full, 847 classes, MaskFormer detectron2 layout with uint16 TIFF labels."""

    dataset = "ade20k_full"
    n_cls = 847
    ignore_index = 65535
    reduce_zero_label = False
    class_names = class_table("ade20k_full")[0]
    palette = np.random.default_rng(847).integers(0, 256, size=(847, 3), dtype=np.uint8)
    default_root = "data/ADE20K_2021_17_01"
    label_bits = 16
    label_suffix = ".tif"
    root_marker = image_folder = "images_detectron2"
    label_folder = "annotations_detectron2"
    root_dirname = "ADE20K_2021_17_01"
    expected_tree = (
        "ADE20K_2021_17_01/{images,annotations}_detectron2/{training,validation}/ADE_*.{jpg,tif}"
    )


READERS: dict[str, type[SegmentationSource]] = {
    "ade20k": ADE20K,
    "coco_stuff10k": COCOStuff10k,
    "coco_stuff164k": COCOStuff164k,
    "pascal_context": PascalContext,
    "ade20k_full": ADE20KFull,
    "synthetic_ade20k": SyntheticADE20K,
    "folder": FolderSource,
}


def _nonempty(value: Any) -> Any:
    """A config value that may be unset ((), "", None) → None, else as given."""
    if value is None or (isinstance(value, str | tuple | list) and len(value) == 0):
        return None
    return value


def folder_options(data: Any) -> dict[str, Any]:
    """The `FolderSource` keyword args that come from a config's `data` (classes, palette,
    ignore colour); unset keys are left out so the classes file decides."""
    opts = {
        "classes": _nonempty(data.get("classes")),
        "palette": _nonempty(data.get("palette")),
        "ignore_color": _nonempty(data.get("ignore_color")),
    }
    return {k: (list(v) if k == "classes" else v) for k, v in opts.items() if v is not None}


def dataset_labels(data: Any) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, (n_cls, 3) uint8 palette) of a config's `data` section.

    A fixed reader's class table; for `folder` the instance's definition (data.classes /
    data.palette, else <data.root>/classes.txt|json). Raises ConfigError for an unknown
    dataset and DatasetError for a folder without readable classes.
    """
    if data.dataset not in READERS:
        raise ConfigError(f"unknown data.dataset {data.dataset!r}; known: {', '.join(READERS)}")
    if data.dataset == "folder":
        return folder_labels(data.root, **folder_options(data))
    cls = READERS[data.dataset]
    return tuple(cls.class_names), np.asarray(cls.palette, np.uint8)


def labels_for_model(data: Any, n_cls: int) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, palette) for a model with n_cls classes trained on `data`.

    The dataset's (`dataset_labels`) when it has n_cls classes, else the shared fallback
    ("class_<i>", `generic_palette`) of `class_names_and_palette`.
    """
    if data.dataset == "folder":
        names, palette = dataset_labels(data)
        if len(names) == n_cls:
            return names, palette
    return class_names_and_palette(data.dataset, n_cls)


def reader_class(dataset: str) -> type[SegmentationSource]:
    """The reader class of `dataset` (a config's data.dataset); unknown names raise."""
    if dataset not in READERS:
        raise DatasetError(f"unknown data.dataset {dataset!r}; known: {', '.join(READERS)}")
    return READERS[dataset]


def dataset_facts(dataset: str) -> dict[str, Any]:
    """The `data` config keys that follow from a dataset name, plus its class count `n_cls`."""
    if dataset not in READERS:
        raise ConfigError(f"unknown data.dataset {dataset!r}; known: {', '.join(READERS)}")
    cls = READERS[dataset]
    return dict(
        dataset=dataset,
        n_cls=cls.n_cls,
        root=cls.default_root,
        train_split=cls.train_split,
        val_split=cls.val_split,
        mean=tuple(cls.mean),
        std=tuple(cls.std),
        ignore_index=cls.ignore_index,
        reduce_zero_label=cls.reduce_zero_label,
    )


def make_source(
    dataset: str, root: str | os.PathLike, split: str, **opts: Any
) -> SegmentationSource:
    """The reader of `dataset` for `split` under `root` (a config's data.dataset / data.root).

    opts are passed to the reader (`validate_labels`, `reduce_zero_label`, `ignore_index`;
    for `folder` also `classes`, `palette`, `ignore_color`, `split_list`); None means the
    reader's own setting.
    Raises DatasetError for an unknown dataset name and DatasetNotFoundError for a missing
    root, split folder or split list. Call `check_layout()` on the result before training.
    """
    cls = reader_class(dataset)
    if cls is FolderSource:
        opts = {k: v for k, v in opts.items() if v is not None}
    return cls(root, split, **opts)
