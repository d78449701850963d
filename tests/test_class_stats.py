"""Inverse-frequency class weights: counted once from the training labels, then cached."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rankseg_jax.data import class_stats, folder, imageio, readers


def _make(root, labels):
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations" / "train").mkdir(parents=True)
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    for i, label in enumerate(labels):
        h, w = label.shape
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "images" / "train" / f"{i}.jpg")
        Image.fromarray(label.astype(np.uint8), mode="L").save(
            root / "annotations" / "train" / f"{i}.png"
        )


@pytest.fixture()
def labelled(tmp_path):
    rng = np.random.default_rng(0)
    # class 3 never occurs; class 0 dominates; some ignore.
    labels = [rng.choice([0, 0, 0, 0, 1, 1, 2, 255], size=(12, 10 + i)) for i in range(5)]
    _make(tmp_path, labels)
    return tmp_path, labels


def _weights(source):
    return class_stats.inverse_frequency_weights(source, progress=False)


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = imageio.read_label

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(imageio, "read_label", counting)
    return calls


def test_weights_computed_once_then_read_from_cache(labelled, monkeypatch, capsys):
    root, labels = labelled
    source = folder.FolderSource(root, "train")
    decodes = _count_decodes(monkeypatch)
    first = class_stats.inverse_frequency_weights(source, progress=True)
    assert not first.from_cache and len(decodes) == len(labels)
    assert "class frequencies" in capsys.readouterr().err  # the progress bar
    flat = np.concatenate([label.ravel() for label in labels])
    want = np.bincount(flat[flat < 4], minlength=4)
    np.testing.assert_array_equal(first.counts, want)
    assert first.weights[3] == 0.0
    expected = want.sum() / (3 * want[:3].astype(float))
    np.testing.assert_allclose(first.weights[:3], expected, rtol=1e-12)
    assert float((want / want.sum()) @ first.weights) == pytest.approx(1.0)
    assert first.cache_path.startswith(str(root / class_stats.CACHE_DIRNAME))
    entry = json.loads(open(first.cache_path).read())
    assert entry["counts"] == want.tolist()

    decodes.clear()
    again = class_stats.inverse_frequency_weights(
        folder.FolderSource(root, "train"), progress=False
    )
    assert again.from_cache and decodes == []  # nothing decoded on the second run
    np.testing.assert_array_equal(again.weights, first.weights)
    assert again.cache_path == first.cache_path


def test_changed_label_or_classes_recompute(labelled):
    root, labels = labelled
    first = class_stats.inverse_frequency_weights(
        folder.FolderSource(root, "train"), progress=False
    )
    changed = labels[2].copy()
    changed[:] = 3
    Image.fromarray(changed.astype(np.uint8), mode="L").save(root / "annotations/train/2.png")
    second = class_stats.inverse_frequency_weights(
        folder.FolderSource(root, "train"), progress=False
    )
    assert not second.from_cache and second.cache_path != first.cache_path
    assert second.counts[3] == changed.size and second.weights[3] > 0
    renamed = folder.FolderSource(root, "train", classes=["w", "x", "y", "z"])
    third = class_stats.inverse_frequency_weights(renamed, progress=False)
    assert not third.from_cache  # the label definition is part of the key
    np.testing.assert_array_equal(third.counts, second.counts)


def test_builtin_reader_and_unwritable_cache(synthetic_ade, tmp_path):
    source = readers.SyntheticADE20K(synthetic_ade, "validation")
    cache = tmp_path / "cache"
    got = class_stats.inverse_frequency_weights(source, cache_dir=cache, progress=False)
    labels = [source[i]["label"] for i in range(len(source))]
    flat = np.concatenate([label.ravel() for label in labels])
    np.testing.assert_array_equal(got.counts, np.bincount(flat[flat < 150], minlength=150))
    assert got.cache_path.startswith(str(cache))
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    again = class_stats.inverse_frequency_weights(source, cache_dir=blocked, progress=False)
    assert again.cache_path is None and not again.from_cache  # warned, still computed
    np.testing.assert_array_equal(again.counts, got.counts)


def test_no_labelled_pixel_is_one_line():
    with pytest.raises(class_stats.DatasetError, match="no labelled pixel"):
        class_stats.inverse_frequency(np.zeros(4, np.int64))
