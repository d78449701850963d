"""mIoU exactly as mmseg computes it, plus RankSeg's top-k recall ceilings.

mmseg (`core/evaluation/metrics.py`, `custom.py::pre_eval`) builds, per image, three histograms
over the n_cls classes of the pixels whose ground truth is not the ignore value: the intersection
(pred == gt), the prediction and the ground truth (`torch.histc`, so values outside
[0, n_cls - 1] fall in no bin). They are summed over the whole dataset, and only then divided:

    IoU_c = I_c / (P_c + G_c - I_c)    Acc_c = I_c / G_c    aAcc = sum(I) / sum(G)

A class with zero union (or zero ground truth, for Acc) is NaN and skipped by the `nanmean` that
gives mIoU and mAcc. Reports are `round(100 * x, 2)`.

Here the per-batch histograms are computed on device in int32 (`intersect_and_union`, jittable;
JAX has no int64 without x64 mode, and one batch never holds 2^31 pixels), and summed on the host
in numpy int64 (`MeanIoU`): ADE20K val alone has ~10^8 labelled pixels, far past float32's 2^24
exact range, and a long multi-scale run can pass 2^31.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rankseg_jax.errors import InputError

# Rows of a counts array (3, n_cls): intersection, prediction, ground truth.
INTERSECT, PRED, LABEL = 0, 1, 2


def intersect_and_union(
    pred: jax.Array,
    label: jax.Array,
    n_cls: int,
    ignore_index: int = 255,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Per-class pixel counts of one batch, on device: int32 (3, n_cls) = (I, P, G).

    pred, label: integer arrays of the same shape, e.g. (B, H, W). Pixels whose label equals
    `ignore_index`, or where `valid` (same shape, bool) is False (padding, fake examples), are
    dropped, as mmseg drops GT == 255. As with `torch.histc`, a value outside [0, n_cls - 1]
    counts in no bin of its own histogram (a prediction there still removes nothing from G).
    Jittable; `n_cls` and `ignore_index` must be static.
    """
    pred = jnp.asarray(pred).astype(jnp.int32)
    label = jnp.asarray(label).astype(jnp.int32)
    keep = label != ignore_index
    if valid is not None:
        keep = keep & jnp.asarray(valid, bool)
    pred_ok = keep & (pred >= 0) & (pred < n_cls)
    label_ok = keep & (label >= 0) & (label < n_cls)
    inter_ok = pred_ok & label_ok & (pred == label)
    index = jnp.concatenate(
        [
            jnp.where(inter_ok, pred, 0).ravel(),
            jnp.where(pred_ok, pred + n_cls, 0).ravel(),
            jnp.where(label_ok, label + 2 * n_cls, 0).ravel(),
        ]
    )
    weight = jnp.concatenate([inter_ok.ravel(), pred_ok.ravel(), label_ok.ravel()])
    counts = jnp.zeros(3 * n_cls, jnp.int32).at[index].add(weight.astype(jnp.int32))
    return counts.reshape(3, n_cls)


@partial(jax.jit, static_argnames=("n_cls", "ignore_index"))
def batch_counts(
    pred: jax.Array,
    label: jax.Array,
    valid: jax.Array,
    *,
    n_cls: int,
    ignore_index: int = 255,
) -> jax.Array:
    """Jitted `intersect_and_union` of a padded batch (B, H, W) with its mask (B, H, W) bool."""
    return intersect_and_union(pred, label, n_cls, ignore_index, valid)


def reduce_zero_label(label: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """mmseg's `reduce_zero_label`: 0 becomes ignore, every other class shifts down by one.

    (The ignore value itself stays the ignore value: mmseg's 255 -> 254 -> 255.)
    """
    label = np.asarray(label).astype(np.int64)
    reduced = np.where(label == 0, ignore_index, label - 1)
    return np.where(label == ignore_index, ignore_index, reduced)


def counts_numpy(
    pred: np.ndarray, label: np.ndarray, n_cls: int, ignore_index: int = 255
) -> np.ndarray:
    """Host version of `intersect_and_union` for one image: int64 (3, n_cls)."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    label = np.asarray(label).astype(np.int64).ravel()
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]

    def hist(values: np.ndarray) -> np.ndarray:
        values = values[(values >= 0) & (values < n_cls)]
        return np.bincount(values, minlength=n_cls).astype(np.int64)

    return np.stack([hist(pred[pred == label]), hist(pred), hist(label)])


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def scores_from_counts(counts: np.ndarray) -> dict[str, Any]:
    """aAcc, mIoU, mAcc and per-class IoU/Acc (fractions, NaN where undefined) from (3, n_cls)."""
    counts = np.asarray(counts, dtype=np.int64)
    inter, pred, label = (counts[i].astype(np.float64) for i in (INTERSECT, PRED, LABEL))
    union = pred + label - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
        acc = np.where(label > 0, inter / np.where(label > 0, label, 1), np.nan)
        total = label.sum()
        aacc = float(inter.sum() / total) if total > 0 else math.nan
    return {
        "aAcc": aacc,
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "IoU": [float(v) for v in iou],
        "Acc": [float(v) for v in acc],
    }


def percent(value: float) -> float:
    """mmseg's report format: round(100 * x, 2) (NaN stays NaN)."""
    return value if math.isnan(value) else round(100.0 * value, 2)


class MeanIoU:
    """Dataset-level accumulator: int64 (3, n_cls) sums of per-batch/per-image device counts."""

    def __init__(self, n_cls: int, class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != n_cls:
            raise InputError(f"class_names has {len(class_names)} names for n_cls={n_cls}")
        self.n_cls = n_cls
        self.class_names = list(class_names) if class_names else [str(c) for c in range(n_cls)]
        self.counts = np.zeros((3, n_cls), np.int64)
        self.num_images = 0

    def update(self, counts: Any, num_images: int = 1) -> None:
        """Add a (3, n_cls) counts array (device int32 or host ints), summing in int64."""
        counts = np.asarray(counts).astype(np.int64)
        if counts.shape != (3, self.n_cls):
            raise InputError(f"counts must have shape (3, {self.n_cls}), got {counts.shape}")
        self.counts += counts
        self.num_images += num_images

    def result(self) -> dict[str, Any]:
        """Fractions as mmseg computes them, per-class values keyed by class name, a summary."""
        scores = scores_from_counts(self.counts)
        return {
            **scores,
            "summary": {key: percent(scores[key]) for key in ("aAcc", "mIoU", "mAcc")},
            "class_names": self.class_names,
            "num_images": self.num_images,
            "num_classes": self.n_cls,
            "num_pixels": int(self.counts[LABEL].sum()),
        }


def topk_recall(selected: np.ndarray, label_hist: np.ndarray) -> tuple[float, float]:
    """RankSeg ceilings of one image: (pixel recall, image recall); NaN without valid pixels.

    selected: (n_cls,) bool, the classes the prediction can output (in the image's top-k).
    label_hist: (n_cls,) ground-truth pixel counts of the image (ignore dropped).
    pixel recall = sum_{c in topk} G_c / sum_c G_c (`decode.acc_pix`);
    image recall = |topk & present| / |present| (`decode.acc_img`).
    """
    selected = np.asarray(selected, bool)
    label_hist = np.asarray(label_hist, np.int64)
    present = label_hist > 0
    total = int(label_hist.sum())
    if total == 0:
        return math.nan, math.nan
    pixel = float(label_hist[selected].sum() / total)
    image = float((selected & present).sum() / present.sum())
    return pixel, image


class TopkRecall:
    """Mean over images of the top-k recall ceilings, as the reference's training metrics average.

    Each image contributes its own ratio (not pooled pixel counts); images with no valid pixel
    give NaN and are skipped, like `pixel_recall`/`img_recall` in `losses/accuracy.py`.
    """

    def __init__(self) -> None:
        self.pixel: list[float] = []
        self.image: list[float] = []
        self.num_selected: list[int] = []

    def update(self, selected: np.ndarray, label_hist: np.ndarray) -> None:
        pixel, image = topk_recall(selected, label_hist)
        self.num_selected.append(int(np.asarray(selected, bool).sum()))
        if not math.isnan(pixel):
            self.pixel.append(pixel)
            self.image.append(image)

    def result(self) -> dict[str, float]:
        """pixel_recall, image_recall (fractions), mean_selected (classes per image), images."""
        mean = lambda xs: float(np.mean(xs)) if xs else math.nan
        return {
            "pixel_recall": mean(self.pixel),
            "image_recall": mean(self.image),
            "mean_selected": mean(self.num_selected),
            "num_images": len(self.pixel),
        }


def format_table(results: dict[str, Any]) -> str:
    """A readable per-class table (IoU/Acc in %) followed by the aAcc/mIoU/mAcc summary."""
    names = results.get("class_names") or [str(c) for c in range(len(results["IoU"]))]
    width = max([5] + [len(n) for n in names])
    fmt = lambda v: "   nan" if math.isnan(v) else f"{percent(v):6.2f}"
    lines = [f"{'Class':<{width}} |    IoU |    Acc", f"{'-' * width}-+--------+-------"]
    for name, iou, acc in zip(names, results["IoU"], results["Acc"], strict=True):
        lines.append(f"{name:<{width}} | {fmt(iou)} | {fmt(acc)}")
    lines.append(
        "aAcc {:.2f}  mIoU {:.2f}  mAcc {:.2f}".format(
            *(percent(results[k]) for k in ("aAcc", "mIoU", "mAcc"))
        )
    )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(results: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """Write the results dict as JSON (NaN -> null, as in the official miou.json), atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# mDice, mFscore, precision/recall, and the confusion matrix (issue 16)
# --------------------------------------------------------------------------------------------


def f_score(precision: np.ndarray, recall: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """mmseg's `f_score`: (1 + β²)·P·R / (β²·P + R), elementwise, NaN where P or R is NaN or
    both are 0 (0/0, as torch divides)."""
    precision = np.asarray(precision, np.float64)
    recall = np.asarray(recall, np.float64)
    b2 = float(beta) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1 + b2) * (precision * recall) / (b2 * precision + recall)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise with NaN where den is 0 (num ≤ den here, so never ±inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def extended_scores_from_counts(counts: np.ndarray, beta: float = 1.0) -> dict[str, Any]:
    """Every metric of mmseg's `eval_metrics(metrics=['mIoU', 'mDice', 'mFscore'], beta=β)`.

    counts: (3, n_cls) int dataset sums (I, P, G) as `MeanIoU.counts`. Per class (fractions,
    NaN where undefined), as mmseg's `total_area_to_metrics`:

        Dice_c = 2·I_c / (P_c + G_c)      Precision_c = I_c / P_c      Recall_c = I_c / G_c
        Fscore_c = f_score(Precision_c, Recall_c, β)

    so a class never labelled but predicted has Dice 0, Precision 0, Recall and Fscore NaN; a
    class never predicted but labelled has Precision NaN, Recall 0, Fscore NaN. The means
    (`mDice`, `mFscore`, `mPrecision`, `mRecall`) are nanmeans, as `mIoU`. Returns the keys of
    `scores_from_counts` plus Dice, Fscore, Precision, Recall (lists of n_cls floats), those
    four means, and `beta`.
    """
    counts = np.asarray(counts, dtype=np.int64)
    inter, pred, label = (counts[i].astype(np.float64) for i in (INTERSECT, PRED, LABEL))
    dice = _ratio(2 * inter, pred + label)
    precision = _ratio(inter, pred)
    recall = _ratio(inter, label)
    fscore = f_score(precision, recall, beta)
    scores = scores_from_counts(counts)
    for key, values in (
        ("Dice", dice),
        ("Fscore", fscore),
        ("Precision", precision),
        ("Recall", recall),
    ):
        scores[key] = [float(v) for v in values]
        scores[f"m{key}"] = _nanmean(values)
    scores["beta"] = float(beta)
    return scores


def per_class_table(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{class name: {IoU, Acc, Dice, Fscore, Precision, Recall}} for the eval JSON (fractions)."""
    names = results.get("class_names") or [str(c) for c in range(len(results["IoU"]))]
    keys = [k for k in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall") if k in results]
    return {name: {k: results[k][c] for k in keys} for c, name in enumerate(names)}


def format_extended_table(results: dict[str, Any]) -> str:
    """Per-class IoU/Acc/Dice/Fscore/Precision/Recall in % and the dataset means, for logs."""
    names = results.get("class_names") or [str(c) for c in range(len(results["IoU"]))]
    keys = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")
    width = max([5] + [len(n) for n in names])
    fmt = lambda v: "    nan" if math.isnan(v) else f"{percent(v):7.2f}"
    header = f"{'Class':<{width}} |" + " |".join(f"{k:>9}" for k in keys)
    lines = [header, "-" * len(header)]
    for c, name in enumerate(names):
        lines.append(f"{name:<{width}} |" + " |".join(f"  {fmt(results[k][c])}" for k in keys))
    means = ("aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall")
    beta = results.get("beta", 1.0)
    lines.append(
        "  ".join(f"{k} {percent(results[k]):.2f}" for k in means) + f"  (Fscore beta={beta:g})"
    )
    return "\n".join(lines)


def confusion_counts(
    pred: jax.Array,
    label: jax.Array,
    n_cls: int,
    ignore_index: int = 255,
    valid: jax.Array | None = None,
) -> jax.Array:
    """The confusion matrix of one batch on device: int32 (n_cls, n_cls), rows = ground truth,
    columns = prediction.

    pred, label: integer arrays of one shape, e.g. (B, H, W); `valid` (same shape, bool) drops
    padding. Exactly the pixels `intersect_and_union` counts in its intersection enter: label
    not ignore_index, both values in [0, n_cls). Hence diag = I, column sums = P, and row sums
    = G whenever every prediction is a class id (argmax always is); union = row + column −
    diag. Jittable with static n_cls and ignore_index. int32 is safe per batch (see the module
    docstring); sum batches on the host in int64 (`ConfusionMatrix`).
    """
    pred = jnp.asarray(pred).astype(jnp.int32)
    label = jnp.asarray(label).astype(jnp.int32)
    keep = (label != ignore_index) & (label >= 0) & (label < n_cls) & (pred >= 0) & (pred < n_cls)
    if valid is not None:
        keep = keep & jnp.asarray(valid, bool)
    index = jnp.where(keep, label * n_cls + pred, 0).ravel()
    counts = jnp.zeros(n_cls * n_cls, jnp.int32).at[index].add(keep.ravel().astype(jnp.int32))
    return counts.reshape(n_cls, n_cls)


@partial(jax.jit, static_argnames=("n_cls", "ignore_index"))
def batch_confusion(
    pred: jax.Array,
    label: jax.Array,
    valid: jax.Array,
    *,
    n_cls: int,
    ignore_index: int = 255,
) -> jax.Array:
    """Jitted `confusion_counts` of a padded batch (B, H, W) with its mask (B, H, W) bool."""
    return confusion_counts(pred, label, n_cls, ignore_index, valid)


def confusion_numpy(
    pred: np.ndarray, label: np.ndarray, n_cls: int, ignore_index: int = 255
) -> np.ndarray:
    """Host version of `confusion_counts` for one image: int64 (n_cls, n_cls)."""
    pred = np.asarray(pred).astype(np.int64).ravel()
    label = np.asarray(label).astype(np.int64).ravel()
    keep = (label != ignore_index) & (label >= 0) & (label < n_cls) & (pred >= 0) & (pred < n_cls)
    flat = np.bincount(label[keep] * n_cls + pred[keep], minlength=n_cls * n_cls)
    return flat.astype(np.int64).reshape(n_cls, n_cls)


def counts_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """(3, n_cls) int64 (I, P, G) of a confusion matrix: diagonal, column sums, row sums."""
    confusion = np.asarray(confusion, np.int64)
    return np.stack([np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)])


def most_confused(
    confusion: np.ndarray, top: int = 10, normalise: bool = True
) -> list[tuple[int, int, float]]:
    """The `top` off-diagonal (true class, predicted class, value) pairs, largest first.

    With `normalise` the value is the share of the true class's pixels (row-normalised);
    otherwise the pixel count. Pairs with value 0 are left out; ties break by class ids.
    """
    confusion = np.asarray(confusion, np.float64)
    if normalise:
        rows = confusion.sum(axis=1, keepdims=True)
        confusion = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    off = confusion.copy()
    np.fill_diagonal(off, 0.0)
    true, predicted = np.nonzero(off > 0)
    values = off[true, predicted]
    order = np.lexsort((predicted, true, -values))[:top]
    return [(int(true[i]), int(predicted[i]), float(values[i])) for i in order]


class ConfusionMatrix:
    """Dataset-level confusion matrix: int64 (n_cls, n_cls) sums of per-batch device counts.

    Saved with every evaluation (`save`, `.npy`); its `counts()` are the (I, P, G) sums that
    `MeanIoU` accumulates, so every score of `extended_scores_from_counts` follows from it.
    """

    def __init__(self, n_cls: int, class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != n_cls:
            raise InputError(f"class_names has {len(class_names)} names for n_cls={n_cls}")
        self.n_cls = n_cls
        self.class_names = list(class_names) if class_names else [str(c) for c in range(n_cls)]
        self.matrix = np.zeros((n_cls, n_cls), np.int64)

    def update(self, confusion: Any) -> None:
        """Add an (n_cls, n_cls) confusion matrix (device int32 or host ints) in int64."""
        confusion = np.asarray(confusion).astype(np.int64)
        if confusion.shape != (self.n_cls, self.n_cls):
            raise InputError(
                f"confusion must have shape ({self.n_cls}, {self.n_cls}), got {confusion.shape}"
            )
        self.matrix += confusion

    def counts(self) -> np.ndarray:
        """(3, n_cls) int64 (I, P, G)."""
        return counts_from_confusion(self.matrix)

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write the int64 matrix as `.npy` (rows = ground truth, columns = prediction)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".tmp"), "wb") as f:
            np.save(f, self.matrix)
        path.with_name(path.name + ".tmp").replace(path)
        return path
