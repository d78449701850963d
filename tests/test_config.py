"""The config contract: `data.reduce_zero_label` / `data.ignore_index` drive label conversion,
the loss and the mIoU; a reader/model class-count mismatch stops before anything compiles."""

from __future__ import annotations

import pathlib

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax import losses, metrics, train
from rankseg_jax.config import load_config, validate
from rankseg_jax.data.pipeline import PipelineConfig, TrainIterator
from rankseg_jax.data.sources import source_from_config
from rankseg_jax.errors import ConfigError

# Raw file values of the tiny dataset: 0 ("other" in ADE20K) and classes 1..3.
RAW_VALUES = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def tiny_ade(tmp_path_factory) -> pathlib.Path:
    """Two 32×32 ADE20K-layout images whose labels hold the raw values 0..3 in quarters."""
    root = tmp_path_factory.mktemp("tiny_ade") / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(2):
            label = np.zeros((32, 32), np.uint8)
            label[:16, 16:], label[16:, :16], label[16:, 16:] = 1, 2, 3
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            assert cv2.imwrite(str(root / "images" / split / f"ADE_{i}.jpg"), image)
            assert cv2.imwrite(str(root / "annotations" / split / f"ADE_{i}.png"), label)
    return root


def tiny_config(root: pathlib.Path, **data):
    config = load_config("configs/demo.py:runlocal")
    with config.unlocked():
        config.batch_size = 2
        config.model.update(width=32, depth=1, num_heads=1, mlp_dim=64, dec_heads=1)
        config.model.update(img_size=(32, 32), dec_layers=2, classifier="full", k=150)
        config.data.update(root=str(root), crop_size=(32, 32), img_scale=(32, 32))
        config.data.update(ratio_range=(1.0, 1.0), flip_prob=0.0, cat_max_ratio=1.0)
        config.data.update(num_workers=0, generate_if_missing=False, **data)
    validate(config)
    return config


def loss_labels(config) -> np.ndarray:
    """The label batch the training loss receives (the train pipeline of `config`)."""
    source = source_from_config(config, "train")
    with TrainIterator(source, PipelineConfig.from_config(config)) as pipeline:
        return np.asarray(next(pipeline)["label"])


def loss_of(config, labels: np.ndarray) -> float:
    """The training loss of fixed class logits (class c scores c / 10) on `labels`."""
    masks = jnp.broadcast_to(jnp.arange(150, dtype=jnp.float32) / 10, (*labels.shape, 150))
    outputs = {"masks": masks, "topk": None}
    total, _ = losses.segmentation_losses(
        outputs, jnp.asarray(labels), config.loss, 150, config.data.ignore_index
    )
    return float(total)


def miou_of(config, labels: np.ndarray) -> float:
    """mIoU of a prediction that is class 0 everywhere, scored with the config's ignore."""
    pred = np.zeros_like(labels)
    counts = metrics.counts_numpy(pred, labels, 150, config.data.ignore_index)
    meter = metrics.MeanIoU(150)
    meter.update(counts)
    return float(meter.result()["mIoU"])


def test_reduce_zero_label_changes_the_labels_the_loss_sees_and_the_miou(tiny_ade):
    reduced = tiny_config(tiny_ade)  # the ADE20K default: 0 → ignore, k → k - 1
    raw = tiny_config(tiny_ade, reduce_zero_label=False)
    reduced_labels, raw_labels = loss_labels(reduced), loss_labels(raw)
    assert set(np.unique(reduced_labels)) == {0, 1, 2, 255}
    assert set(np.unique(raw_labels)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(np.where(raw_labels == 0, 255, raw_labels - 1), reduced_labels)
    assert loss_of(reduced, reduced_labels) != loss_of(raw, raw_labels)
    assert miou_of(reduced, reduced_labels) != miou_of(raw, raw_labels)


def test_ignore_index_changes_the_labels_the_loss_sees_and_the_miou(tiny_ade):
    default = tiny_config(tiny_ade)
    other = tiny_config(tiny_ade, ignore_index=200)
    labels_255, labels_200 = loss_labels(default), loss_labels(other)
    assert 255 in labels_255 and 255 not in labels_200
    np.testing.assert_array_equal(np.where(labels_200 == 200, 255, labels_200), labels_255)
    # Whatever the value, those pixels stay out of the loss and out of the mIoU.
    assert loss_of(other, labels_200) == pytest.approx(loss_of(default, labels_255), rel=1e-6)
    assert miou_of(other, labels_200) == miou_of(default, labels_255)
    with_pixels = np.where(labels_200 == 200, 0, labels_200)  # if they were scored as class 0
    assert miou_of(other, with_pixels) != miou_of(other, labels_200)


def test_class_count_mismatch_is_one_line_before_compilation(tiny_ade, tmp_path, monkeypatch):
    config = tiny_config(tiny_ade)
    with config.unlocked():
        config.model.n_cls = 171
    with pytest.raises(ConfigError) as info:
        validate(config)
    message = str(info.value)
    assert "\n" not in message and "model.n_cls=171" in message and "150 classes" in message

    def no_compile(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(train, "create_model", no_compile)
    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(ConfigError, match="model.n_cls=171"):
        train.train_and_evaluate(config, str(tmp_path))
