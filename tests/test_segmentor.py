"""The public inference API and slide inference of the real model against the fixtures."""

from __future__ import annotations

import numpy as np
import pytest

from rankseg_jax import Segmentor, inference
from rankseg_jax.errors import ConfigError
from rankseg_testing.official import small_config

FIXTURE_NAME = {"rankseg": "rankseg", "mask": "baseline"}


@pytest.fixture(scope="module")
def segmentors(official):
    return {
        head: Segmentor.from_config(
            small_config(head), official / f"{FIXTURE_NAME[head]}_small.pth"
        )
        for head in ("rankseg", "mask")
    }


@pytest.mark.parametrize("head", ["rankseg", "mask"])
@pytest.mark.parametrize("name", ["x64", "x64x100"])
def test_slide_inference_matches_official(official, segmentors, head, name):
    """Slide windows (crop = stride = 64; x64x100 has two overlapping windows) + softmax."""
    ref = np.load(official / f"{FIXTURE_NAME[head]}_fwd_{name}.npz")
    images = np.load(official / f"{name}.npy").transpose(0, 2, 3, 1)
    inferencer = segmentors[head].inferencer
    for i, image in enumerate(images):
        out = inferencer.predict(image, return_probs=True)
        np.testing.assert_allclose(out.probs, ref["slide_probs"][i].transpose(1, 2, 0), atol=1e-5)
        np.testing.assert_array_equal(out.pred, ref["slide_pred"][i])
    if name == "x64x100":
        assert out.windows == 2


def test_logits_and_class_scores(official, segmentors):
    seg = segmentors["rankseg"]
    assert seg.num_params == 332_474
    images = np.load(official / "x64x100.npy").transpose(0, 2, 3, 1)
    ref = np.load(official / "rankseg_fwd_x64x100.npz")
    np.testing.assert_allclose(
        seg.logits(images), ref["seg_logits"].transpose(0, 2, 3, 1), atol=1e-5
    )
    scores, topk = seg.class_scores(images)
    assert scores.dtype == np.float32 and topk.dtype == np.int32
    np.testing.assert_array_equal(topk, ref["topk_index"])


def test_predict_raw_image(segmentors):
    image = np.random.default_rng(0).integers(0, 256, (37, 91, 3), dtype=np.uint8)
    labels = segmentors["rankseg"].predict(image)
    assert labels.shape == (37, 91) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < 150


def test_from_config_string_and_errors(official, segmentors):
    seg = Segmentor.from_config("configs/ade20k_segmenter.py:runlocal")
    assert seg.config.model.classifier == "rankseg"
    with pytest.raises(ValueError, match="no image-level class scores"):
        segmentors["mask"].class_scores(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"uint8 RGB image \(H, W, 3\)"):
        seg.predict(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="H≥16"):
        seg.logits(np.zeros((1, 8, 64, 3), np.float32))
    with pytest.raises(ConfigError, match="nope.py"):
        Segmentor.from_config("configs/nope.py")


def test_predict_uses_config_scales(official):
    """ms+flip settings reach predict: flip on a symmetric image gives a symmetric result."""
    config = small_config("rankseg")
    with config.unlocked():
        config.eval.update(scales=(0.75, 1.0), flip=True)
        config.data.test_scale = (256, 64)
    seg = Segmentor.from_config(config, official / "rankseg_small.pth")
    half = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    image = np.concatenate([half, half[:, ::-1]], axis=1)
    labels = seg.predict(image)
    np.testing.assert_array_equal(labels, labels[:, ::-1])
    _, kw = inference.settings_from_config(config)
    assert kw["ratios"] == (0.75, 1.0) and kw["flip"]
