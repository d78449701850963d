"""`source_from_config`: a config's `data` → its random-access source (directory or TFDS).

The readers and their registry are rankseg_jax.data.readers.
"""

from __future__ import annotations

from typing import Any

from rankseg_jax.data import synthetic
from rankseg_jax.data.base import SegmentationSource
from rankseg_jax.data.prepared import PreparedSource
from rankseg_jax.data.readers import folder_options, make_source, reader_class
from rankseg_jax.errors import ConfigError, DatasetError


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
    so evaluation and training on the demo need no download. The layout (pairing) is checked;
    a folder dataset's labels are all decoded and checked too (`FolderSource.check_examples`).
    `data.reduce_zero_label` and `data.ignore_index` set the label conversion.
    Raises DatasetNotFoundError with the path and the config key for a missing dataset.
    """
    data = config.data
    name = {"train": data.train_split, "val": data.val_split}.get(split, split)
    storage = data.get("source", "directory")
    labels = dict(
        reduce_zero_label=data.get("reduce_zero_label"), ignore_index=data.get("ignore_index")
    )
    if storage == "tfds":
        reduce = labels["reduce_zero_label"]
        if reduce is not None and bool(reduce) != reader_class(data.dataset).reduce_zero_label:
            raise ConfigError(
                f"data.reduce_zero_label={reduce} with data.source='tfds': the prepared "
                "labels are already converted with the dataset's own setting"
            )
        prepared = PreparedSource(
            data.dataset,
            name,
            data.get("tfds_data_dir") or None,
            ignore_index=labels["ignore_index"],
        )
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
        synthetic.ensure_ade20k(
            data.root,
            int(data.synthetic_train),
            int(data.synthetic_val),
            int(data.synthetic_seed),
            val_seed=int(data.synthetic_val_seed),
        )
    opts = dict(labels, **opts)
    if data.dataset == "folder":  # the label definition and split lists come from the config
        opts = dict(folder_options(data), **opts)
        split_list = {"train": data.get("train_split_list"), "val": data.get("val_split_list")}
        if split_list.get(split):
            opts.setdefault("split_list", split_list[split])
    source = make_source(data.dataset, data.root, name, **opts)
    source.check_layout()
    if data.dataset == "folder":  # your own labels: every one checked before the model
        source.check_examples(skip_corrupt=bool(data.get("skip_corrupt", False)))
    return source
