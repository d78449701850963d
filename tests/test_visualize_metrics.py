"""The evaluation figures: row-normalised confusion matrix with its most confused pairs, and
per-class IoU bars, as Figures and as uint8 arrays for TensorBoard."""

from __future__ import annotations

import numpy as np
import pytest

from rankseg_jax import metrics, visualize
from rankseg_jax.data.readers import ADE20K
from rankseg_jax.errors import InputError

CLASS_NAMES, PALETTE = ADE20K.class_names, ADE20K.palette


def _confusion(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.diag(rng.integers(100, 5000, n)).astype(np.int64)
    for _ in range(4 * n):
        i, j = rng.integers(0, n, 2)
        m[i, j] += rng.integers(0, 800)
    return m


def test_row_normalise():
    norm = visualize.row_normalise(np.array([[3, 1], [0, 0]]))
    np.testing.assert_allclose(norm, [[0.75, 0.25], [0.0, 0.0]])


def test_confusion_figure_150_classes_names_the_most_confused_pairs():
    m = _confusion(150)
    fig = visualize.confusion_figure(m, CLASS_NAMES, top_pairs=20)
    matrix_ax, bars_ax = fig.axes[:2]
    shown = matrix_ax.images[0].get_array()
    np.testing.assert_allclose(shown, visualize.row_normalise(m))
    labels = [t.get_text() for t in bars_ax.get_yticklabels()]
    pairs = metrics.most_confused(m, top=20)
    assert len(labels) == 20
    t, p, _ = pairs[0]
    assert labels[0] == f"{CLASS_NAMES[t]} → {CLASS_NAMES[p]}"  # the top bar is the worst pair
    assert all(tick.get_fontsize() >= 8 for tick in bars_ax.get_yticklabels())
    image = visualize.figure_to_array(fig)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] <= 1200 and image.shape[1] <= 1600
    assert image.std() > 10  # not a blank canvas


def test_confusion_image_small_names_every_class():
    names = ("road", "sky", "tree", "car", "person", "building", "water")
    m = _confusion(7, seed=1)
    fig = visualize.confusion_figure(m, names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(names)
    assert [t.get_text() for t in ax.get_xticklabels()] == list(names)
    image = visualize.confusion_image(m, names)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    with pytest.raises(InputError, match="class names"):
        visualize.confusion_figure(m, names[:3])
    quiet = visualize.confusion_figure(np.diag([5, 6]), ["a", "b"])  # nothing confused
    assert "no confusion" in [t.get_text() for t in quiet.axes[1].texts]


def test_iou_bars_sorted_with_nan_last():
    iou = [0.2, float("nan"), 0.9, 0.5]
    names = ["a", "b", "c", "d"]
    fig = visualize.iou_bar_figure(iou, names, sort=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c", "d", "a", "b"]
    widths = sorted((p.get_y(), p.get_width()) for p in ax.patches)
    assert [round(w, 6) for _, w in widths][::-1] == [90.0, 50.0, 20.0, 0.0]
    assert any(t.get_text().strip() == "n/a" for t in ax.texts)
    image = visualize.iou_bar_image(np.linspace(0, 1, 150), CLASS_NAMES, PALETTE)
    assert image.dtype == np.uint8 and image.shape[0] > 1500  # tall enough for 150 names
