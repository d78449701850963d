"""TFDS builders that turn a local directory dataset into array_record (one per dataset).

Each builder (registered names `rankseg_ade20k`, `rankseg_coco_stuff10k`,
`rankseg_coco_stuff164k`, `rankseg_pascal_context`, `rankseg_ade20k_full`,
`rankseg_synthetic_ade20k`, `rankseg_folder`) reads the user's download from `manual_dir` (the
same root that `data.root` names for the directory readers) through our reader of that
dataset, so there is one source of truth for listing, pairing, label conversion and validation.
Each example stores

    image: the image file's original bytes (decoding them gives exactly the reader's pixels),
    label: a PNG of the reader's class ids (uint8; uint16 for ADE20K-Full, ignore 65535),
    name:  the example's stem,

in the reader's order (shuffling is disabled; keys keep the order). A folder dataset (your own
data) writes every split folder present under both images/ and annotations/, and its label
definition (classes, palette, ignore value: `FolderSource.definition()`) beside the records as
`label_definition.json`, which `PreparedSource` reads. The files are written as
array_record, which `tfds.data_source` reads with random access on every host, without
TensorFlow. Writing needs tensorflow-datasets (and importlib_resources) but not TensorFlow.

Use `prepare(dataset, root, data_dir)` or `python data/prepare_tfds.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from rankseg_jax.data import folder, prepared
from rankseg_jax.data.base import SegmentationSource
from rankseg_jax.data.readers import READERS, make_source
from rankseg_jax.errors import DatasetError

log = logging.getLogger(__name__)

BUILDER_VERSION = prepared.BUILDER_VERSION
_KEY_SPACE = 1 << 128  # TFDS shuffle keys are 128-bit; see _order_key


def encode_label(label: np.ndarray, dtype: type[np.unsignedinteger]) -> bytes:
    """PNG bytes of a (H, W) class-id array, as uint8 ("L") or uint16 ("I;16")."""
    array = np.ascontiguousarray(label.astype(dtype))
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _order_key(index: int, count: int) -> int:
    """An integer key that keeps the reader's order when TFDS shuffling is disabled.

    With `disable_shuffling` TFDS sorts examples by key inside 1000 buckets chosen by
    `key * 1000 // 2**128`; spreading the keys over that range keeps the order and lets large
    splits use every bucket (small keys would put the whole split into one in-memory bucket).
    """
    return index * (_KEY_SPACE // max(count, 1))


class RankSegBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Generic builder; subclasses set DATASET (a `make_source` dataset name)."""

    DATASET: ClassVar[str] = ""
    VERSION = tfds.core.Version(BUILDER_VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        BUILDER_VERSION: "Original image bytes, class-id PNG labels, names; reader order."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir (--root of data/prepare_tfds.py) at the dataset root that "
        "data.root names for the directory reader; see data/README.md."
    )

    def _reader_class(self) -> type[SegmentationSource]:
        return READERS[self.DATASET]

    def _info(self) -> tfds.core.DatasetInfo:
        cls = self._reader_class()
        if self.DATASET == "folder":  # classes per instance: see label_definition.json
            description = (
                f"a folder dataset (your own data) prepared by rankseg_jax from its layout "
                f"{cls.expected_tree}; classes, palette and ignore value in "
                f"{prepared.DEFINITION_FILE}. image: original file bytes; label: PNG of class ids."
            )
        else:
            label_dtype = prepared.label_dtype(self.DATASET)
            description = (
                f"{self.DATASET} ({cls.n_cls} classes, ignore {cls.ignore_index}) prepared by "
                f"rankseg_jax from its directory layout {cls.expected_tree}. image: original "
                f"file bytes; label: {np.dtype(label_dtype).name} PNG of class ids."
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "label": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "name": tfds.features.Text(),
                }
            ),
            # Keep the directory reader's order, so index i is the same example in both.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        root = str(dl_manager.manual_dir)
        out = {}
        for split in _splits(self.DATASET, root):
            source = make_source(self.DATASET, root, split)
            source.check_layout()
            out[split] = self._generate_examples(source)
        return out

    def _generate_examples(self, source: SegmentationSource) -> Iterator[tuple[int, dict]]:
        definition = source.definition() if hasattr(source, "definition") else None
        dtype = prepared.label_dtype(self.DATASET, definition)
        count = len(source)
        for i in range(count):
            example = source[i]  # decodes and validates, as training would
            image_path, _ = source.paths(i)
            with open(image_path, "rb") as f:
                image_bytes = f.read()
            yield (
                _order_key(i, count),
                {
                    "image": image_bytes,
                    "label": encode_label(example["label"], dtype),
                    "name": example["name"],
                },
            )


def _splits(dataset: str, root: str | os.PathLike) -> list[str]:
    """The splits a builder writes: the reader's, or a folder dataset's split folders."""
    if dataset == "folder":
        return folder.available_splits(root)
    return list(READERS[dataset].split_aliases)


def _builder(dataset: str) -> type[RankSegBuilder]:
    """The builder class of one reader (TFDS registers it under `prepared.builder_name`)."""
    cls_name = "Rankseg" + "".join(part.title() for part in dataset.split("_"))
    doc = f"{dataset}: {READERS[dataset].__doc__}"
    attrs = dict(name=prepared.builder_name(dataset), DATASET=dataset, __doc__=doc)
    return type(cls_name, (RankSegBuilder,), dict(attrs, __module__=__name__))


# One builder per reader: a new dataset needs only its reader (rankseg_jax.data.readers).
BUILDERS: dict[str, type[RankSegBuilder]] = {name: _builder(name) for name in READERS}


def prepare(dataset: str, root: str | os.PathLike, data_dir: str | os.PathLike | None) -> str:
    """Write every split of `dataset` under `root` to data_dir as array_record; return its dir.

    The directory readers check the root and each split's layout first, so a wrong `root`
    gives their one-line error. An existing prepared version is left as it is (TFDS skips it);
    delete data_dir/rankseg_<dataset>/ to prepare again.
    """
    if dataset not in BUILDERS:
        raise DatasetError(f"unknown --dataset {dataset!r}; known: {', '.join(BUILDERS)}")
    if importlib.util.find_spec("importlib_resources") is None:
        # TFDS imports it lazily while writing (reading does not need it).
        raise ImportError(
            "preparing a TFDS dataset needs the importlib_resources package "
            "(in requirements.txt): pip install importlib_resources"
        )
    splits = _splits(dataset, root)
    if not splits:
        raise DatasetError(f"{root}: no split folder under both images/ and annotations/")
    sources = [make_source(dataset, root, split) for split in splits]
    for source in sources:
        source.check_layout()
    root = os.path.abspath(os.fspath(root))
    data_dir = prepared.resolve_data_dir(data_dir)
    builder = BUILDERS[dataset](data_dir=data_dir, file_format="array_record")
    with tempfile.TemporaryDirectory(prefix="rankseg_tfds_") as scratch:  # nothing is downloaded
        builder.download_and_prepare(
            download_dir=scratch,
            download_config=tfds.download.DownloadConfig(manual_dir=root, try_download_gcs=False),
        )
    if dataset == "folder":  # the classes live on the instance: store them with the records
        path = os.path.join(str(builder.data_dir), prepared.DEFINITION_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(sources[0].definition(), f, indent=1)
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> int:
    """CLI of data/prepare_tfds.py: prepare one dataset, print where; 2 on a dataset error."""

    parser = argparse.ArgumentParser(
        description="Write a local dataset as TFDS array_record (read with data.source='tfds')."
    )
    parser.add_argument("--dataset", required=True, choices=sorted(BUILDERS))
    parser.add_argument(
        "--root", required=True, help="the dataset root, as data.root for the directory reader"
    )
    parser.add_argument(
        "--data_dir",
        default="",
        help="TFDS data dir to write (data.tfds_data_dir); default $TFDS_DATA_DIR or "
        "~/tensorflow_datasets",
    )
    args = parser.parse_args(argv)
    try:
        path = prepare(args.dataset, args.root, args.data_dir or None)
    except (DatasetError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data_dir = prepared.resolve_data_dir(args.data_dir or None)
    counts = ", ".join(
        f"{s}: {len(prepared.PreparedSource(args.dataset, s, data_dir))}"
        for s in prepared.prepared_splits(path)
    )
    print(
        f"prepared {args.dataset} in {path} ({counts}); train or evaluate with "
        f"--config.data.source=tfds --config.data.tfds_data_dir={data_dir}"
    )
    return 0
