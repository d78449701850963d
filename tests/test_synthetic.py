"""The generated ADE20K-format dataset: determinism, exact layout, class statistics, the reader."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from rankseg_jax.data import synthetic
from rankseg_jax.data.readers import make_source
from rankseg_jax.errors import DatasetError

N_TRAIN, N_VAL = 6, 3


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("syn")
    synthetic.generate_ade20k(root, N_TRAIN, N_VAL, seed=3)
    return root


def test_same_seed_gives_byte_identical_files(generated, tmp_path):
    synthetic.generate_ade20k(tmp_path, N_TRAIN, N_VAL, seed=3)
    first, second = _files(generated), _files(tmp_path)
    assert len(first) == 2 * (N_TRAIN + N_VAL) + 1
    assert first == second


def test_other_seed_gives_other_images(generated, tmp_path):
    synthetic.generate_ade20k(tmp_path, N_TRAIN, N_VAL, seed=4)
    first, second = _files(generated), _files(tmp_path)
    assert first.keys() == second.keys()
    differing = [k for k in first if k.endswith(".jpg") and first[k] != second[k]]
    assert len(differing) == N_TRAIN + N_VAL


def test_examples_do_not_depend_on_dataset_size(generated, tmp_path):
    synthetic.generate_ade20k(tmp_path, 2, 1, seed=3)
    small, large = _files(tmp_path), _files(generated)
    shared = [k for k in small if k != synthetic.MANIFEST and not k.endswith(".json")]
    assert len(shared) == 6
    assert all(small[k] == large[k] for k in shared)


def test_exact_ade_layout(generated):
    ade = generated / "ADEChallengeData2016"
    for split, prefix, n in (("training", "train", N_TRAIN), ("validation", "val", N_VAL)):
        images = sorted(os.listdir(ade / "images" / split))
        labels = sorted(os.listdir(ade / "annotations" / split))
        assert images == [f"ADE_{prefix}_{i:08d}.jpg" for i in range(1, n + 1)]
        assert labels == [name[:-4] + ".png" for name in images]
        with Image.open(ade / "images" / split / images[0]) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
        with Image.open(ade / "annotations" / split / labels[0]) as im:
            assert (im.format, im.mode) == ("PNG", "L")


def test_label_statistics(generated):
    ade = generated / "ADEChallengeData2016"
    sizes, unlabeled = set(), 0
    for path in sorted((ade / "annotations").rglob("*.png")):
        raw = np.asarray(Image.open(path))
        classes = set(np.unique(raw).tolist()) - {0}
        assert 3 <= len(classes) <= 8, (path, classes)
        assert raw.min() >= 0 and raw.max() <= 150
        sizes.add(raw.shape)
        unlabeled += int((raw == 0).sum())
        assert all(96 <= side <= 320 for side in raw.shape)
    assert len(sizes) == N_TRAIN + N_VAL  # varied sizes and aspect ratios
    assert unlabeled > 0


def test_many_classes_overall_few_per_image():
    seen = set()
    for i in range(60):
        _, raw = synthetic.make_example(0, 0, i, 48, 64)
        classes = set(np.unique(raw).tolist()) - {0}
        assert 3 <= len(classes) <= 8
        seen |= classes
    assert len(seen) >= 100  # of 150, from only 60 small images


def test_class_styles_are_distinct():
    styles = synthetic.STYLES
    assert len(styles) == 150
    looks = {(s.family, s.bg) if s.family == 0 else (s.family, s.period, s.fg) for s in styles}
    assert len(looks) == 150


def test_ade_reader_reads_generated_data(generated):
    for dataset, root in (
        ("synthetic_ade20k", generated),
        ("ade20k", generated / "ADEChallengeData2016"),
    ):
        source = make_source(dataset, root, "validation")
        source.check_layout()
        assert len(source) == N_VAL and source.n_cls == 150 and source.ignore_index == 255
        example = source[0]
        assert example["name"] == "ADE_val_00000001"
        assert example["image"].dtype == np.uint8 and example["image"].shape[-1] == 3
        label = example["label"]
        assert label.dtype == np.int32 and label.shape == example["image"].shape[:2]
        raw = np.asarray(
            Image.open(
                generated / "ADEChallengeData2016/annotations/validation" / "ADE_val_00000001.png"
            )
        ).astype(np.int32)
        np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw - 1))


def test_ensure_regenerates_only_when_arguments_change(tmp_path):
    path = synthetic.ensure_ade20k(tmp_path / "ADEChallengeData2016", 2, 1, seed=0)
    manifest = pathlib.Path(path) / synthetic.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    assert synthetic.ensure_ade20k(tmp_path, 2, 1, seed=0) == path
    assert manifest.stat().st_mtime_ns == stamp
    synthetic.ensure_ade20k(tmp_path, 3, 1, seed=0)
    assert len(os.listdir(pathlib.Path(path) / "images" / "training")) == 3


def test_refuses_to_overwrite_a_real_dataset(tmp_path):
    (tmp_path / "ADEChallengeData2016" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="not a generated dataset"):
        synthetic.generate_ade20k(tmp_path, 1, 1)


def test_cli(tmp_path, capsys):
    synthetic.main(["--root", str(tmp_path), "--train", "2", "--val", "1", "--seed", "5"])
    assert "wrote 2 training + 1 validation images" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "ADEChallengeData2016" / "images" / "training")) == 2
