"""Prepared formats: TFDS array_record builders and PreparedSource equal the directory readers.

A tiny generated ADE20K-format dataset with photo-like JPEGs of 512-600 px sides is prepared
once per module into a temporary TFDS data dir; every comparison is exact (no tolerance).
"""

from __future__ import annotations

import dataclasses
import pickle

import cv2
import ml_collections
import numpy as np
import pytest
from PIL import Image

from rankseg_jax.data import imageio, synthetic
from rankseg_jax.data import pipeline as pl
from rankseg_jax.data import transforms as T
from rankseg_jax.data.prepared import PreparedSource, builder_name
from rankseg_jax.data.readers import make_source
from rankseg_jax.data.sources import source_from_config
from rankseg_jax.errors import DatasetError, DatasetNotFoundError

tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow_datasets not installed")
builders = pytest.importorskip("rankseg_jax.data.tfds_builders.builders")

AUG = T.TrainAugment(crop_size=(64, 64), img_scale=(256, 64), ignore_index=255)
CFG = pl.PipelineConfig(seed=5, global_batch=2, augment=AUG, test_scale=(256, 64))
SPLITS = ("training", "validation")


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """(directory root, TFDS data dir) of 3 train + 2 val generated images, prepared once."""
    tmp = tmp_path_factory.mktemp("prepared")
    root = synthetic.generate_ade20k(tmp / "ade", 3, 2, seed=2, min_side=512, max_side=600)
    data_dir = str(tmp / "tfds")
    assert builders.main(["--dataset=ade20k", f"--root={root}", f"--data_dir={data_dir}"]) == 0
    return root, data_dir


def tfds_config(root: str, data_dir: str, source: str = "tfds") -> ml_collections.ConfigDict:
    data = dict(dataset="ade20k", root=root, train_split="training", val_split="validation")
    data.update(source=source, tfds_data_dir=data_dir, generate_if_missing=False)
    return ml_collections.ConfigDict({"data": data})


def assert_same_example(a: dict, b: dict) -> None:
    assert a["name"] == b["name"]
    for key in ("image", "label"):
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("split", SPLITS)
def test_prepared_examples_equal_directory_reader(ade, split):
    root, data_dir = ade
    directory = make_source("ade20k", root, split)
    prepared = PreparedSource("ade20k", split, data_dir)
    assert len(prepared) == len(directory) == {"training": 3, "validation": 2}[split]
    for attr in ("n_cls", "ignore_index", "reduce_zero_label", "class_names", "split"):
        assert getattr(prepared, attr) == getattr(directory, attr)
    np.testing.assert_array_equal(prepared.palette, directory.palette)
    for i in range(len(directory)):
        expected = directory[i]
        assert min(expected["image"].shape[:2]) >= 512  # the photo-like size the issue asks
        assert_same_example(prepared[i], expected)
    assert_same_example(prepared[-1], directory[-1])


def test_records_hold_original_image_bytes_and_class_id_pngs(ade):
    root, data_dir = ade
    directory = make_source("ade20k", root, "training")
    records = tfds.data_source(builder_name("ade20k"), split="training", data_dir=data_dir)
    for i in range(len(directory)):
        image_path, _ = directory.paths(i)
        with open(image_path, "rb") as f:
            assert bytes(records[i]["image"]) == f.read()  # stored verbatim, not re-encoded
        raw, mode = imageio.decode_label(bytes(records[i]["label"]))
        assert mode == "L" and raw.dtype == np.uint8
        label = directory[i]["label"]
        np.testing.assert_array_equal(raw, label)  # already reduced: 255 = ignore
        assert 255 in raw or raw.max() < 150


def test_prepared_source_pickles_and_reopens(ade):
    _, data_dir = ade
    prepared = PreparedSource("ade20k", "val", data_dir)  # alias of "validation"
    prepared[0]  # open the records before pickling
    clone = pickle.loads(pickle.dumps(prepared))
    assert clone._records is None
    assert_same_example(clone[1], prepared[1])


def test_source_from_config_tfds_matches_directory(ade):
    root, data_dir = ade
    for split in ("train", "val"):
        prepared = source_from_config(tfds_config(root, data_dir), split)
        directory = source_from_config(tfds_config(root, data_dir, "directory"), split)
        assert isinstance(prepared, PreparedSource) and len(prepared) == len(directory)
        assert_same_example(prepared[0], directory[0])
    with pytest.raises(DatasetError, match="unknown data.source 'gcs'"):
        source_from_config(tfds_config(root, data_dir, "gcs"), "val")


def test_pipeline_batches_identical(ade):
    """Training batches (one grain worker process for the prepared source) and eval batches."""
    root, data_dir = ade
    directory = make_source("ade20k", root, "training")
    prepared = PreparedSource("ade20k", "training", data_dir)
    expected = list(pl.TrainIterator(directory, CFG, num_steps=3, process_index=0, process_count=1))
    worker_cfg = dataclasses.replace(CFG, num_workers=1, prefetch=1)
    with pl.TrainIterator(
        prepared, worker_cfg, num_steps=3, process_index=0, process_count=1
    ) as it:
        got = list(it)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected, strict=True):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))

    val_dir, val_tfds = (
        make_source("ade20k", root, "validation"),
        PreparedSource("ade20k", "validation", data_dir),
    )
    kw = dict(batch_size=2, process_index=0, process_count=1)
    for a, b in zip(
        pl.eval_batches(val_tfds, CFG, **kw), pl.eval_batches(val_dir, CFG, **kw), strict=True
    ):
        assert a["name"] == b["name"] and a["valid"].tolist() == b["valid"].tolist()
        for x, y in zip(a["image"] + a["label"], b["image"] + b["label"], strict=True):
            np.testing.assert_array_equal(x, y)


def test_missing_prepared_data_names_place_and_command(tmp_path, ade):
    root, _ = ade
    empty = tmp_path / "empty_tfds"
    with pytest.raises(DatasetNotFoundError) as err:
        source_from_config(tfds_config(root, str(empty)), "train")
    message = str(err.value)
    assert "\n" not in message
    assert str(empty) in message and "rankseg_ade20k" in message
    assert "data/prepare_tfds.py --dataset=ade20k" in message and "data.tfds_data_dir" in message


def test_prepare_bad_root_is_one_line_error(tmp_path, capsys):
    code = builders.main(
        ["--dataset=ade20k", f"--root={tmp_path / 'nowhere'}", f"--data_dir={tmp_path}"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "nowhere" in err and "root not found" in err
    assert not (tmp_path / builder_name("ade20k")).exists()


def test_ade20k_full_uint16_labels_round_trip(tmp_path):
    """ADE20K-Full keeps 847 classes and ignore 65535 through a uint16 PNG."""
    full = tmp_path / "ADE20K_2021_17_01"
    rng = np.random.default_rng(0)
    values = np.array([[0, 255, 846, 65535], [1, 2, 3, 300]], np.uint16).repeat(4, 0).repeat(5, 1)
    for split, prefix in (("training", "train"), ("validation", "val")):
        image = full / "images_detectron2" / split / f"ADE_{prefix}_00000001.jpg"
        label = full / "annotations_detectron2" / split / f"ADE_{prefix}_00000001.tif"
        image.parent.mkdir(parents=True)
        label.parent.mkdir(parents=True)
        rgb = rng.integers(0, 256, (*values.shape, 3), dtype=np.uint8)
        cv2.imwrite(str(image), rgb)
        Image.fromarray(values).save(label, format="TIFF")
    data_dir = tmp_path / "tfds"
    builders.prepare("ade20k_full", full, data_dir)
    for split in ("training", "validation"):
        prepared = PreparedSource("ade20k_full", split, data_dir)
        expected = make_source("ade20k_full", full, split)[0]
        assert_same_example(prepared[0], expected)
        assert sorted(np.unique(prepared[0]["label"]).tolist()) == sorted(
            np.unique(values).tolist()
        )


def test_prepare_without_importlib_resources_says_so(tmp_path, monkeypatch, capsys, ade):
    root, _ = ade
    real = builders.importlib.util.find_spec
    monkeypatch.setattr(
        builders.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "importlib_resources" else real(name, *a),
    )
    code = builders.main(["--dataset=ade20k", f"--root={root}", f"--data_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "pip install importlib_resources" in err


def test_order_keys_keep_reader_order_across_tfds_buckets():
    """Large splits spill into TFDS's 1000 sorted buckets; keys must keep order across them."""
    from tensorflow_datasets.core import shuffle

    count = 20_210  # ADE20K training
    keys = [builders._order_key(i, count) for i in range(count)]
    assert all(a < b for a, b in zip(keys, keys[1:], strict=False)) and keys[-1] < 1 << 128
    buckets = [shuffle.get_bucket_number(k, shuffle.BUCKETS_NUMBER) for k in keys]
    assert buckets == sorted(buckets) and len(set(buckets)) == shuffle.BUCKETS_NUMBER
