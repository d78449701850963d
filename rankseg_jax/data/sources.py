"""`make_source`: the dataset name of a config → its reader (a random-access source)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from rankseg_jax.data.ade20k import ADE20K, SyntheticADE20K
from rankseg_jax.data.ade20k_full import ADE20KFull
from rankseg_jax.data.base import DatasetError, SegmentationSource
from rankseg_jax.data.coco_stuff import COCOStuff10k, COCOStuff164k
from rankseg_jax.data.pascal_context import PascalContext

if TYPE_CHECKING:
    from rankseg_jax.data.prepared import PreparedSource

READERS: dict[str, type[SegmentationSource]] = {
    "ade20k": ADE20K,
    "coco_stuff10k": COCOStuff10k,
    "coco_stuff164k": COCOStuff164k,
    "pascal_context": PascalContext,
    "ade20k_full": ADE20KFull,
    "synthetic_ade20k": SyntheticADE20K,
}


def make_source(
    dataset: str, root: str | os.PathLike, split: str, **opts: Any
) -> SegmentationSource:
    """The reader of `dataset` for `split` under `root` (a config's data.dataset / data.root).

    opts are passed to the reader (`validate_labels`). Raises DatasetError for an unknown
    dataset name and DatasetNotFoundError for a missing root, split folder or split list.
    Call `check_layout()` on the result before training to check pairing.
    """
    if dataset not in READERS:
        raise DatasetError(f"unknown data.dataset {dataset!r}; known: {', '.join(READERS)}")
    return READERS[dataset](root, split, **opts)


def source_from_config(
    config: Any, split: str = "val", **opts: Any
) -> SegmentationSource | PreparedSource:
    """The reader of a config's `data` for `split` ("train", "val" or a split name).

    `data.source` picks the storage: "directory" (the readers above, from `data.root`) or
    "tfds" (the array_record prepared by data/prepare_tfds.py under `data.tfds_data_dir`,
    read by `rankseg_jax.data.prepared.PreparedSource`, which gives the same examples;
    `data.generate_if_missing` and reader opts do not apply to it).

    With `data.generate_if_missing` (the demo configs) the generated ADE20K-format dataset is
    written first when it is missing or was generated with other `data.synthetic_*` settings,
    so evaluation and training on the demo need no download. The layout (pairing) is checked.
    Raises DatasetNotFoundError with the path and the config key for a missing dataset.
    """
    data = config.data
    name = {"train": data.train_split, "val": data.val_split}.get(split, split)
    storage = data.get("source", "directory")
    if storage == "tfds":
        from rankseg_jax.data.prepared import PreparedSource

        prepared = PreparedSource(data.dataset, name, data.get("tfds_data_dir") or None)
        prepared.check_layout()
        return prepared
    if storage != "directory":
        raise DatasetError(f"unknown data.source {storage!r}; known: 'directory', 'tfds'")
    if data.generate_if_missing:
        if data.dataset != "synthetic_ade20k":
            raise DatasetError(
                f"data.generate_if_missing works only with data.dataset='synthetic_ade20k' "
                f"(got {data.dataset!r}): real datasets must be downloaded (see data/README.md)"
            )
        from rankseg_jax.data import synthetic

        synthetic.ensure_ade20k(
            data.root,
            int(data.synthetic_train),
            int(data.synthetic_val),
            int(data.synthetic_seed),
            val_seed=int(data.synthetic_val_seed),
        )
    source = make_source(data.dataset, data.root, name, **opts)
    source.check_layout()
    return source
