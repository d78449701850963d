"""Palettes, colour maps, overlays with legends, pixel shares and the ranking figure."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rankseg_jax import visualize
from rankseg_jax.errors import InputError


def test_dataset_palettes_are_the_community_ones():
    names, palette = visualize.dataset_labels("ade20k", 150)
    assert names[:3] == ("wall", "building", "sky") and names[-1] == "flag"
    # mmseg ADE20KDataset.PALETTE: first, second and last colours.
    assert palette[0].tolist() == [120, 120, 120] and palette[1].tolist() == [180, 120, 120]
    assert palette[149].tolist() == [92, 0, 255]
    synth_names, synth_palette = visualize.dataset_labels("synthetic_ade20k", 150)
    assert synth_names == names and np.array_equal(synth_palette, palette)
    # mmseg PascalContextDataset.PALETTE is ADE20K's first 60 colours.
    pc_names, pc_palette = visualize.dataset_labels("pascal_context", 60)
    assert pc_names[0] == "background" and np.array_equal(pc_palette, palette[:60])
    coco_names, coco = visualize.dataset_labels("coco_stuff164k", 171)
    assert coco_names[0] == "person" and coco.shape == (171, 3)
    assert coco[0].tolist() == [0, 192, 64] and coco[170].tolist() == [64, 64, 0]


def test_custom_class_count_gets_generic_names_and_distinct_colours():
    names, palette = visualize.dataset_labels("ade20k", 12)
    assert names[3] == "class_3" and palette.shape == (12, 3) and palette.dtype == np.uint8
    assert len({tuple(c) for c in palette}) == 12


def test_colorize_and_blend():
    palette = np.array([[255, 0, 0], [0, 255, 0]], np.uint8)
    labels = np.array([[0, 1, 255], [0, 0, 1]], np.int32)
    color = visualize.colorize(labels, palette)
    assert color[0, 0].tolist() == [255, 0, 0] and color[0, 1].tolist() == [0, 255, 0]
    assert color[0, 2].tolist() == list(visualize.UNKNOWN_COLOR)
    image = np.full((2, 3, 3), 100, np.uint8)
    mixed = visualize.blend(image, np.zeros((2, 3), np.int32), palette, alpha=0.5)
    np.testing.assert_array_equal(mixed[..., 0], 178)  # (100 + 255) / 2 rounded, no borders
    edges = visualize.boundaries(labels)
    assert edges[0, 0] and edges[1, 1] and not edges[1, 0]  # a change to the right/below
    with pytest.raises(InputError, match="differ in size"):
        visualize.blend(image, np.zeros((3, 3), np.int32), palette)
    with pytest.raises(InputError, match="integer"):
        visualize.colorize(np.zeros((2, 2), np.float32), palette)


def test_class_shares():
    labels = np.array([[2, 2, 2], [5, 5, 7]], np.int32)
    shares = visualize.class_shares(labels)
    assert [(c, n) for c, n, _ in shares] == [(2, 3), (5, 2), (7, 1)]
    assert sum(s for _, _, s in shares) == pytest.approx(1.0, abs=1e-12)
    assert visualize.percent(0.0001) == "<0.1%" and visualize.percent(0.1234) == "12.3%"


def test_overlay_keeps_the_size_and_draws_a_legend():
    names, palette = visualize.dataset_labels("ade20k", 150)
    image = np.full((120, 160, 3), 128, np.uint8)
    labels = np.zeros((120, 160), np.int32)
    labels[:, 80:] = 2
    labels[60:, :40] = 12
    overlay = visualize.overlay_with_legend(image, labels, names, palette)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    plain = visualize.blend(image, labels, palette)
    assert not np.array_equal(overlay[:30, :60], plain[:30, :60])  # the legend box is there
    np.testing.assert_array_equal(overlay[-20:, -20:], plain[-20:, -20:])  # the rest is not
    many = [(f"class {i}", (i, i, i)) for i in range(40)]
    assert visualize.draw_legend(image, many).shape == image.shape  # "+N more", same size


def test_ranking_figure_and_contact_sheet():
    names, palette = visualize.dataset_labels("ade20k", 150)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    labels = np.zeros((64, 96), np.int32)
    labels[:, 50:] = 4
    scores = rng.random(150).astype(np.float32)
    fig = visualize.ranking_figure(image, labels, scores, names, palette, topk=7)
    assert len(fig.axes) == 3
    bars = fig.axes[-1].patches
    assert len(bars) == 7
    widths = [bar.get_width() for bar in sorted(bars, key=lambda b: -b.get_y())]
    np.testing.assert_allclose(widths, np.sort(scores)[::-1][:7], rtol=1e-6)
    gt = np.full((64, 96), 255, np.int32)
    gt[:32] = 4
    assert len(visualize.ranking_figure(image, labels, scores, names, palette, gt=gt).axes) == 4
    buffer = io.BytesIO()
    visualize.save_figure(visualize.contact_sheet([("a", image), ("b", image)] * 3), buffer)
    sheet = np.asarray(Image.open(buffer).convert("RGB"))
    assert sheet.shape[0] > 100 and sheet.shape[1] > 100


def test_write_png_round_trip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    visualize.write_png(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rgb.png")), rgb)
    with pytest.raises(InputError, match="uint8 or uint16"):
        visualize.write_png(tmp_path / "bad.png", rgb.astype(np.float32))
