"""`make_source`: the dataset name of a config → its reader (a random-access source)."""

from __future__ import annotations

import os
from typing import Any

from rankseg_jax.data.ade20k import ADE20K, SyntheticADE20K
from rankseg_jax.data.ade20k_full import ADE20KFull
from rankseg_jax.data.base import DatasetError, SegmentationSource
from rankseg_jax.data.coco_stuff import COCOStuff10k, COCOStuff164k
from rankseg_jax.data.pascal_context import PascalContext

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
