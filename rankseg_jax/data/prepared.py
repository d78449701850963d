"""Read a dataset prepared as TFDS array_record (clusters, TPU pods): `PreparedSource`.

`python data/prepare_tfds.py --dataset=ade20k --root=... --data_dir=...` (the builders in
`rankseg_jax.data.tfds_builders`) writes each split of a directory dataset once, as records of

    {"image": the image file's original bytes, "label": PNG of the class ids (uint8, or uint16
     when the ignore value is above 255, i.e. ADE20K-Full), "name": the example's stem}

in the directory reader's order. Every host then reads the same files through
`tfds.data_source` (random access, no TensorFlow needed to read), and `PreparedSource[i]` equals
the directory reader's `source[i]` exactly: the image bytes are decoded by the same
`imageio.decode_image` (OpenCV, as mmseg), and the label was converted by the reader itself when
it was prepared. Select it with `data.source='tfds'` (and `data.tfds_data_dir`).

TensorFlow Datasets is imported only when a PreparedSource is made, so `import rankseg_jax`
stays fast. The source pickles as (dataset, split, data_dir) and reopens the records in each
grain worker process.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from rankseg_jax.data import imageio
from rankseg_jax.data.readers import reader_class
from rankseg_jax.errors import DatasetError, DatasetNotFoundError

BUILDER_PREFIX = "rankseg_"
BUILDER_VERSION = "1.0.0"  # the version the builders write and this reader reads
PREPARE_COMMAND = (
    "python data/prepare_tfds.py --dataset={dataset} --root=<dataset root> --data_dir={data_dir}"
)


def builder_name(dataset: str) -> str:
    """The registered TFDS builder name of a `data.dataset` name, e.g. "rankseg_ade20k"."""
    return BUILDER_PREFIX + dataset


DEFINITION_FILE = "label_definition.json"  # a folder dataset's classes, beside dataset_info


def label_dtype(dataset: str, definition: dict | None = None) -> type[np.unsignedinteger]:
    """uint8 when every class id and the ignore value fit in a byte, otherwise uint16.

    definition: a folder dataset's label definition (`FolderSource.definition()`), whose
    class count and ignore value are per instance.
    """
    if definition is not None:
        n_cls, ignore = int(definition["n_cls"]), int(definition["ignore_index"])
    else:
        cls = reader_class(dataset)
        n_cls, ignore = cls.n_cls, cls.ignore_index
    return np.uint8 if max(n_cls - 1, ignore) <= 255 else np.uint16


def read_definition(version_dir: str) -> dict[str, Any]:
    """The label definition a prepared folder dataset carries (written by the builder)."""
    path = os.path.join(version_dir, DEFINITION_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetNotFoundError(
            f"{path}: the prepared folder dataset has no readable label definition ({err}); "
            "prepare it again with data/prepare_tfds.py --dataset=folder"
        ) from None


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """The TFDS data dir: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    path = str(data_dir or "") or os.environ.get("TFDS_DATA_DIR", "")
    return os.path.abspath(os.path.expanduser(path or "~/tensorflow_datasets"))


def prepared_dir(dataset: str, data_dir: str | os.PathLike | None) -> str:
    """The folder holding the prepared dataset (data_dir/rankseg_<dataset>/BUILDER_VERSION).

    Raises DatasetNotFoundError, naming where it looked and the command that prepares it,
    when no prepared version is there.
    """
    root = resolve_data_dir(data_dir)
    name = builder_name(dataset)
    version_dir = os.path.join(root, name, BUILDER_VERSION)
    if not os.path.isfile(os.path.join(version_dir, "dataset_info.json")):
        command = PREPARE_COMMAND.format(dataset=dataset, data_dir=root)
        raise DatasetNotFoundError(
            f"prepared {dataset} dataset not found: no {name}/{BUILDER_VERSION}/"
            f"dataset_info.json in {root} (config key data.tfds_data_dir); prepare it with "
            f"`{command}` (see data/README.md, Prepared formats)"
        )
    return version_dir


def prepared_splits(version_dir: str) -> list[str]:
    """The split names recorded in a prepared dataset's dataset_info.json."""
    with open(os.path.join(version_dir, "dataset_info.json"), encoding="utf-8") as f:
        info = json.load(f)
    return [s["name"] for s in info.get("splits", [])]


class PreparedSource:
    """A dataset prepared by `rankseg_jax.data.tfds_builders`, with the directory reader's API.

    `len(source)`, `source[i] -> {"image": uint8 (H, W, 3) RGB, "label": int32 (H, W),
    "name": str}` and the attributes `dataset`, `n_cls`, `ignore_index`, `reduce_zero_label`
    (already applied, as by the directory reader), `class_names`, `palette`, `split`, `root`.
    """

    def __init__(
        self,
        dataset: str,
        split: str,
        data_dir: str | os.PathLike | None = None,
        *,
        ignore_index: int | None = None,
    ):
        """Open split `split` (a canonical name or an alias) of the prepared `dataset`.

        `ignore_index` (the config's `data.ignore_index`) relabels the stored ignore value.
        Raises DatasetNotFoundError when the prepared data or the split is missing.
        """
        cls = reader_class(dataset)
        self.dataset = dataset
        self.data_dir = resolve_data_dir(data_dir)
        self.root = prepared_dir(dataset, self.data_dir)
        if dataset == "folder":  # the label definition was stored with the records
            definition = read_definition(self.root)
            self.n_cls = int(definition["n_cls"])
            self._stored_ignore = int(definition["ignore_index"])
            self.reduce_zero_label = bool(definition["reduce_zero_label"])
            self.class_names = tuple(definition["class_names"])
            self.palette = np.asarray(definition["palette"], np.uint8)
            self.split = str(split)
        else:
            definition = None
            self.n_cls = cls.n_cls
            self._stored_ignore = cls.ignore_index
            self.reduce_zero_label = cls.reduce_zero_label
            self.class_names = cls.class_names
            self.palette = cls.palette
            self.split = cls.canonical_split(split)
        self.ignore_index = self._stored_ignore if ignore_index is None else int(ignore_index)
        self.label_bits = 8 if label_dtype(dataset, definition) == np.uint8 else 16
        self._records: Any = None
        self.num_examples = len(self._open())

    # ------------------------------------------------------------------------- records
    def _open(self) -> Any:
        """The TFDS random-access data source of the split (opened once per process)."""
        if self._records is None:
            try:  # tensorflow_datasets is optional and heavy: imported only for data.source=tfds
                import tensorflow_datasets as tfds
            except ImportError as err:
                raise DatasetError(
                    f"data.source='tfds' needs tensorflow-datasets and array-record "
                    f"(requirements.txt): {err}"
                ) from err
            available = prepared_splits(self.root)
            if self.split not in available:
                raise DatasetNotFoundError(
                    f"{self.root}: prepared {self.dataset} has no split {self.split!r} "
                    f"(prepared splits: {', '.join(available) or 'none'}); prepare it with "
                    f"`{PREPARE_COMMAND.format(dataset=self.dataset, data_dir=self.data_dir)}`"
                )
            self._records = tfds.builder_from_directory(self.root).as_data_source(split=self.split)
        return self._records

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_records"] = None  # file handles do not pickle; reopened in the worker
        return state

    def __len__(self) -> int:
        return self.num_examples

    def paths(self, index: int) -> tuple[str, str]:
        """Where example `index` lives, for messages: ("<records>[i] image", "... label")."""
        where = f"{self.root}/{builder_name(self.dataset)}-{self.split}[{int(index)}]"
        return f"{where} image", f"{where} label"

    def check_layout(self) -> None:
        """Raise DatasetNotFoundError for an empty prepared split."""
        if not self.num_examples:
            raise DatasetNotFoundError(
                f"{self.root}: prepared {self.dataset} split {self.split!r} has no examples"
            )

    def __getitem__(self, index: int) -> dict[str, Any]:
        """{"image": (H, W, 3) uint8 RGB, "label": (H, W) int32, "name": stem}."""
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.dataset} {self.split}: index {index} out of {len(self)}")
        index %= len(self)
        record = self._open()[index]
        image_where, label_where = self.paths(index)
        image = imageio.decode_image(bytes(record["image"]), image_where)
        raw, mode = imageio.decode_label(bytes(record["label"]), label_where)
        expected = ("L",) if self.label_bits == 8 else ("I;16", "I;16L", "I;16B", "I")
        if mode not in expected or raw.ndim != 2:
            raise DatasetError(
                f"{label_where}: prepared label has mode {mode} with shape {raw.shape}, "
                f"expected {expected[0]}; prepare the dataset again"
            )
        if raw.shape != image.shape[:2]:
            raise DatasetError(
                f"{label_where}: label size {raw.shape} differs from image size "
                f"{image.shape[:2]}; prepare the dataset again"
            )
        name = record["name"]
        name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
        label = raw.astype(np.int32)
        if self.ignore_index != self._stored_ignore:
            label[label == self._stored_ignore] = self.ignore_index
        return {"image": image, "label": label, "name": name}

    def __repr__(self) -> str:
        return (
            f"PreparedSource(dataset={self.dataset!r}, split={self.split!r}, root={self.root!r}, "
            f"examples={len(self)}, n_cls={self.n_cls}, ignore_index={self.ignore_index})"
        )
