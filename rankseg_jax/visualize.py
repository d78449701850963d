"""Pictures of predictions: palette colours, overlays with a legend, the class-ranking figure.

Everything here is numpy + OpenCV except the figures, which use matplotlib's object-oriented
API (`matplotlib.figure.Figure`, rendered by Agg) so that nothing touches pyplot's global state
or the notebook backend. Palettes are the ones the community draws with (mmseg's ADE20K,
COCO-Stuff and Pascal-Context palettes, from the dataset readers).

Shapes: images (H, W, 3) uint8 RGB; label maps (H, W) integer class ids; palettes (C, 3) uint8;
scores (C,) float.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO, Any

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from rankseg_jax.data import readers
from rankseg_jax.errors import InputError
from rankseg_jax.metrics import most_confused

# Pixels with an id outside the palette (ignore values) are drawn in this colour.
UNKNOWN_COLOR = (0, 0, 0)
FIGURE_DPI = 100
LEGEND_MAX = 8  # classes named under a figure's picture


# ------------------------------------------------------------------------------------------
# Class names and palettes.


def dataset_labels(dataset: str, n_cls: int) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, palette (n_cls, 3) uint8) of `dataset` for n_cls classes (one fallback)."""
    return readers.class_names_and_palette(dataset, n_cls)


def model_labels(config: Any) -> tuple[tuple[str, ...], np.ndarray]:
    """(class names, palette (n_cls, 3) uint8) of a config's model and dataset: the dataset
    instance's own for `data.dataset='folder'` (classes file or data.classes/data.palette)."""
    return readers.labels_for_model(config.data, int(config.model.n_cls))


# ------------------------------------------------------------------------------------------
# Label maps as pictures.


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"label map must be an integer (H, W) array, got {labels.dtype} "
                             f"{labels.shape}")  # fmt: skip
    return labels


def _check_image(image: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"image must be uint8 RGB (H, W, 3), got {image.dtype} {image.shape}")
    if labels is not None and labels.shape != image.shape[:2]:
        raise InputError(f"label map {labels.shape} and image {image.shape[:2]} differ in size")
    return image


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids → (H, W, 3) uint8 palette colours; ids outside the palette are black."""
    labels = _check_labels(labels)
    palette = np.asarray(palette, np.uint8)
    table = np.concatenate([palette, np.array([UNKNOWN_COLOR], np.uint8)])
    index = np.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return table[index]


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another class."""
    labels = _check_labels(labels)
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5):
    """The image with the palette colours of `labels` on top (alpha), class borders in white."""
    labels = _check_labels(labels)
    image = _check_image(image, labels)
    color = colorize(labels, palette).astype(np.float32)
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * color
    out = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
    out[boundaries(labels)] = 255
    return out


def class_shares(labels: np.ndarray) -> list[tuple[int, int, float]]:
    """(class id, pixels, share of the image) for every class in the map, largest first."""
    labels = _check_labels(labels)
    ids, counts = np.unique(labels, return_counts=True)
    order = np.lexsort((ids, -counts))
    total = labels.size
    return [(int(ids[i]), int(counts[i]), float(counts[i] / total)) for i in order]


def percent(share: float) -> str:
    """A pixel share as text: "12.3%", and "<0.1%" rather than a misleading "0.0%"."""
    return "<0.1%" if 0 < share < 0.0005 else f"{100 * share:.1f}%"


def _legend_font(h: int, w: int, rows: int) -> tuple[float, int, int]:
    """Font scale, row height and thickness for a legend that fits about `rows` rows."""
    row_h = int(np.clip(min(h, w) / 13, 14, 26))
    row_h = max(14, min(row_h, (h - 6) // max(rows, 1)))
    (_, text_h), _ = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)
    return 0.62 * row_h / text_h, row_h, 1


def _truncate(text: str, max_width: int, scale: float) -> str:
    font = cv2.FONT_HERSHEY_SIMPLEX
    while len(text) > 3 and cv2.getTextSize(text, font, scale, 1)[0][0] > max_width:
        text = text[:-2] + "~"
    return text


def draw_legend(image: np.ndarray, entries: Sequence[tuple[str, Sequence[int]]]) -> np.ndarray:
    """The image with a legend box (colour swatch + text per entry) in its top-left corner.

    The output has the image's size: the box covers part of the image (dark, translucent) and
    lists as many entries as fit; the rest are summarised as "+N more".
    """
    image = _check_image(image).copy()
    h, w = image.shape[:2]
    if not entries:
        return image
    scale, row_h, thick = _legend_font(h, w, len(entries))
    max_rows = max(1, (h - 4) // row_h)
    shown = list(entries)
    if len(shown) > max_rows:
        hidden = len(shown) - (max_rows - 1)
        shown = shown[: max_rows - 1] + [(f"+{hidden} more", None)]
    font = cv2.FONT_HERSHEY_SIMPLEX
    pad, swatch = 3, row_h - 4
    max_text = max(8, int(0.8 * w) - swatch - 3 * pad)
    texts = [_truncate(text, max_text, scale) for text, _ in shown]
    text_w = max(cv2.getTextSize(t, font, scale, thick)[0][0] for t in texts)
    box_w = min(w, text_w + swatch + 3 * pad)
    box_h = min(h, len(shown) * row_h + 2 * pad)
    region = image[:box_h, :box_w].astype(np.float32)
    image[:box_h, :box_w] = (0.35 * region).astype(np.uint8)
    for row, (text, (_, color)) in enumerate(zip(texts, shown, strict=True)):
        top = pad + row * row_h
        x_text = pad
        if color is not None:
            c = tuple(int(v) for v in color)
            cv2.rectangle(image, (pad, top + 2), (pad + swatch, top + 2 + swatch), c, -1)
            cv2.rectangle(image, (pad, top + 2), (pad + swatch, top + 2 + swatch), (255,) * 3, 1)
            x_text = 2 * pad + swatch
        baseline = top + row_h - max(3, row_h // 4)
        cv2.putText(image, text, (x_text, baseline), font, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)  # fmt: skip
    return image


def overlay_with_legend(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray,
    alpha: float = 0.5,
) -> np.ndarray:
    """(H, W, 3) uint8: the blended prediction plus a legend of the classes present (share %)."""
    mixed = blend(image, labels, palette, alpha)
    entries = []
    for cls, _, share in class_shares(labels):
        name = class_names[cls] if 0 <= cls < len(class_names) else f"id {cls}"
        color = palette[cls] if 0 <= cls < len(palette) else UNKNOWN_COLOR
        entries.append((f"{name} {percent(share)}", color))
    return draw_legend(mixed, entries)


# ------------------------------------------------------------------------------------------
# Files.


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an RGB (H, W, 3) uint8 or a single-channel uint8/uint16 (H, W) array as PNG."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = np.ascontiguousarray(array[..., ::-1])
    if array.dtype not in (np.uint8, np.uint16):
        raise InputError(f"{path}: PNG arrays must be uint8 or uint16, got {array.dtype}")
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise InputError(f"{path}: PNG encoding failed")
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data.tobytes())
    os.replace(tmp, path)


def save_figure(fig: Any, path: str | os.PathLike | IO[bytes], dpi: int = FIGURE_DPI) -> None:
    """Render a matplotlib Figure to a PNG file (or binary file object) with Agg, no pyplot."""

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")


# ------------------------------------------------------------------------------------------
# Figures.


def _rgb01(color: Sequence[int]) -> tuple[float, float, float]:
    return tuple(float(c) / 255.0 for c in color)


def _show(ax, picture: np.ndarray, title: str) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def _class_legend(ax, classes: Sequence[int], class_names, palette) -> None:
    """Colour patches naming `classes`, below the picture in `ax`."""

    handles = [
        Patch(facecolor=_rgb01(palette[c]), edgecolor="black", linewidth=0.5,
              label=class_names[c] if c < len(class_names) else f"id {c}")
        for c in classes
    ]  # fmt: skip
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2,
              fontsize=7, frameon=False, handlelength=1.0, columnspacing=0.8)  # fmt: skip


def ranking_figure(
    image: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    palette: np.ndarray,
    *,
    topk: int = 10,
    score_label: str = "image-level score",
    title: str = "",
    gt: np.ndarray | None = None,
    ignore_index: int = 255,
):
    """A Figure: image | prediction (| ground truth) | bar chart of the top-k class scores.

    Bars are the `topk` highest `scores` (C,), best on top. A class the prediction contains is
    drawn in its palette colour with its pixel share written next to it; a top-k class absent
    from the prediction is grey and hatched, so the chart shows how the image-level ranking
    and the pixels agree. With `gt` (H, W) (ignore_index allowed), classes in the ground
    truth get a triangle marker.
    """

    labels = _check_labels(labels)
    image = _check_image(image, labels)
    scores = np.asarray(scores, np.float64)
    shares = {cls: share for cls, _, share in class_shares(labels)}
    order = np.argsort(-scores, kind="stable")[: max(1, topk)]
    panels = 3 if gt is None else 4
    h, w = image.shape[:2]
    pic_w = 3.2 * min(max(w / h, 0.6), 2.0)
    fig = Figure(figsize=(pic_w * (panels - 1) + 4.6, 4.2), layout="constrained")
    widths = [pic_w] * (panels - 1) + [4.6]
    axes = fig.subplots(1, panels, gridspec_kw={"width_ratios": widths})
    _show(axes[0], image, "image")
    _show(axes[1], blend(image, labels, palette), f"prediction ({len(shares)} classes)")
    _class_legend(axes[1], list(shares)[:LEGEND_MAX], class_names, palette)
    gt_classes: set[int] = set()
    if gt is not None:
        gt = _check_labels(gt)
        shown = np.where(gt == ignore_index, -1, gt)
        _show(axes[2], blend(image, shown, palette), "ground truth")
        gt_shares = class_shares(np.where(gt == ignore_index, -1, gt))
        gt_classes = {cls for cls, _, _ in gt_shares if cls >= 0}
        _class_legend(axes[2], [c for c, _, _ in gt_shares if c >= 0][:LEGEND_MAX],
                      class_names, palette)  # fmt: skip
    ax = axes[-1]
    ypos = np.arange(len(order))[::-1]
    names = [class_names[c] if c < len(class_names) else f"id {c}" for c in order]
    for y, cls in zip(ypos, order, strict=True):
        present = int(cls) in shares
        color = _rgb01(palette[cls]) if present else (0.82, 0.82, 0.82)
        ax.barh(y, scores[cls], color=color, edgecolor="black" if present else "grey",
                hatch=None if present else "///", linewidth=0.6)  # fmt: skip
        if present:
            ax.text(scores[cls], y, f" {percent(shares[int(cls)])}", va="center", fontsize=7)
        if int(cls) in gt_classes:
            ax.plot([0], [y], marker=">", color="black", markersize=5, clip_on=False)
    ax.set_yticks(ypos, [n if len(n) <= 22 else n[:21] + "~" for n in names], fontsize=8)
    for tick, cls in zip(ax.get_yticklabels(), order, strict=True):
        if int(cls) in shares:
            tick.set_fontweight("bold")
    top = float(scores[order].max()) if len(order) else 1.0
    ax.set_xlim(0.0, max(1.0, top * 1.25) if top > 0.5 else max(top * 1.35, 1e-3))
    ax.set_xlabel(score_label, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"top-{len(order)} classes", fontsize=10)
    handles = [
        Patch(facecolor=(0.5, 0.6, 0.9), edgecolor="black", label="in prediction (share %)"),
        Patch(facecolor=(0.82, 0.82, 0.82), edgecolor="grey", hatch="///", label="not predicted"),
    ]
    if gt is not None:
        handles.append(Line2D([], [], marker=">", color="black", linestyle="", markersize=5,
                              label="in ground truth"))  # fmt: skip
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=len(handles), frameon=False, handlelength=1.2)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def contact_sheet(
    items: Sequence[tuple[str, np.ndarray]], columns: int = 4, cell_inches: float = 2.6
):
    """A Figure with a grid of pictures (e.g. overlays), each titled with its name."""

    if not items:
        raise InputError("a contact sheet needs at least one picture")
    columns = max(1, min(columns, len(items)))
    rows = -(-len(items) // columns)
    fig = Figure(figsize=(cell_inches * columns, cell_inches * rows + 0.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (name, picture) in zip(axes, items, strict=False):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name if len(name) <= 28 else name[:27] + "~", fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------
# Evaluation figures: the confusion matrix and per-class IoU (issue 16). Each has a Figure
# builder and an `*_image` twin returning (H, W, 3) uint8 for TensorBoard / PNG files.

NAMED_MATRIX_MAX = 30  # up to this many classes the matrix names every row and column
CONFUSED_PAIRS = 20


def figure_to_array(fig: Any, dpi: int = FIGURE_DPI) -> np.ndarray:
    """Render a matplotlib Figure with Agg to an (H, W, 3) uint8 RGB array."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def row_normalise(confusion: np.ndarray) -> np.ndarray:
    """(C, C) counts → float64 rows summing to 1 (rows without pixels stay 0)."""
    confusion = np.asarray(confusion, np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "~"


def confusion_figure(
    confusion: np.ndarray,
    class_names: Sequence[str],
    *,
    top_pairs: int = CONFUSED_PAIRS,
    title: str = "",
):
    """A Figure: the row-normalised confusion matrix | its most confused class pairs.

    confusion (C, C) counts, rows = ground truth, columns = prediction. Up to
    NAMED_MATRIX_MAX classes the matrix names every row and column (and prints the shares up
    to 12 classes); beyond, it shows the structure with id ticks, and the class names are
    read from the right panel: the `top_pairs` largest off-diagonal shares as bars labelled
    "true → predicted", in a font that stays readable for 150 classes.
    """
    from matplotlib.figure import Figure

    confusion = np.asarray(confusion)
    n = confusion.shape[0]
    if confusion.shape != (n, n) or len(class_names) != n:
        raise InputError(
            f"confusion matrix {confusion.shape} and {len(class_names)} class names do not match"
        )
    norm = row_normalise(confusion)
    pairs = most_confused(confusion, top=top_pairs)
    named = n <= NAMED_MATRIX_MAX
    side = 4.5 if n <= 12 else (6.5 if named else 7.5)
    bar_h = max(side, 0.28 * len(pairs) + 1.2)
    fig = Figure(figsize=(side + 6.0, max(side, bar_h)), layout="constrained")
    ax, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [side, 5.0]})
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.7, label="share of the true class's pixels")
    if named:
        size = 8 if n <= 15 else 6
        labels = [_short(c) for c in class_names]
        ax.set_xticks(range(n), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(n), labels, fontsize=size)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if norm[i, j] >= 0.005:
                        color = "white" if norm[i, j] > 0.6 else "black"
                        ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center",
                                fontsize=7, color=color)  # fmt: skip
    else:
        step = max(1, int(np.ceil(n / 15 / 5)) * 5)
        ticks = list(range(0, n, step))
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_xlabel("predicted class" + ("" if named else " (id)"), fontsize=9)
    ax.set_ylabel("true class" + ("" if named else " (id)"), fontsize=9)
    ax.set_title(f"confusion matrix, {n} classes (row-normalised)", fontsize=10)
    if pairs:
        slots = max(len(pairs), 10)  # few pairs: thin bars at the top, not one wide block
        ypos = np.arange(len(pairs))[::-1] + (slots - len(pairs))
        bars.set_ylim(-0.7, slots - 0.3)
        values = [100 * v for _, _, v in pairs]
        bars.barh(ypos, values, color=(0.85, 0.35, 0.25), edgecolor="black", linewidth=0.5)
        texts = [f"{_short(class_names[t], 22)} → {_short(class_names[p], 22)}"
                 for t, p, _ in pairs]  # fmt: skip
        bars.set_yticks(ypos, texts, fontsize=8)
        for y, v in zip(ypos, values, strict=True):
            bars.text(v, y, f" {v:.1f}%", va="center", fontsize=7)
        bars.set_xlim(0, max(values) * 1.25)
    else:
        bars.text(0.5, 0.5, "no confusion", ha="center", va="center", transform=bars.transAxes)
        bars.set_yticks([])
    bars.set_xlabel("% of the true class's pixels predicted as the other", fontsize=8)
    bars.tick_params(axis="x", labelsize=7)
    bars.set_title(f"most confused pairs (true → predicted), top {len(pairs)}", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def confusion_image(confusion: np.ndarray, class_names: Sequence[str], **kwargs: Any):
    """`confusion_figure` rendered to (H, W, 3) uint8."""
    return figure_to_array(confusion_figure(confusion, class_names, **kwargs))


def iou_bar_figure(
    iou: Sequence[float],
    class_names: Sequence[str],
    palette: np.ndarray | None = None,
    *,
    sort: bool = True,
    title: str = "",
):
    """A Figure of per-class IoU (fractions; NaN = class absent from prediction and labels) as
    horizontal bars in % (best on top when `sort`), in palette colours, with the mIoU line.
    The figure grows with the class count so every name stays readable (150 classes ≈ 1900
    px tall at FIGURE_DPI)."""
    from matplotlib.figure import Figure

    iou = np.asarray(iou, np.float64)
    n = len(iou)
    if len(class_names) != n:
        raise InputError(f"{n} IoU values and {len(class_names)} class names do not match")
    palette = readers.generic_palette(n) if palette is None else np.asarray(palette, np.uint8)
    order = np.arange(n)
    if sort:
        order = np.array(sorted(range(n), key=lambda c: (np.isnan(iou[c]), -np.nan_to_num(iou[c]))))
    fig = Figure(figsize=(7.0, max(3.0, 0.125 * n + 1.2)), layout="constrained")
    ax = fig.subplots()
    ypos = np.arange(n)[::-1]
    values = 100 * np.nan_to_num(iou[order])
    colors = [_rgb01(palette[c]) for c in order]
    ax.barh(ypos, values, color=colors, edgecolor="black", linewidth=0.4, height=0.8)
    size = 8 if n <= 40 else 6
    ax.set_yticks(ypos, [_short(class_names[c], 24) for c in order], fontsize=size)
    for y, c in zip(ypos, order, strict=True):
        text = "n/a" if np.isnan(iou[c]) else f"{100 * iou[c]:.1f}"
        ax.text(100 * np.nan_to_num(iou[c]), y, f" {text}", va="center", fontsize=size - 1)
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    if np.isfinite(miou):
        ax.axvline(100 * miou, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlim(0, 110)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"IoU (%), mIoU {100 * miou:.2f} (dashed)", fontsize=9)
    ax.set_title(title or f"per-class IoU, {n} classes", fontsize=10)
    return fig


def iou_bar_image(iou: Sequence[float], class_names: Sequence[str], palette=None, **kwargs):
    """`iou_bar_figure` rendered to (H, W, 3) uint8."""
    return figure_to_array(iou_bar_figure(iou, class_names, palette, **kwargs))
