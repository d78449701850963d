"""mIoU against the official mmseg numbers and against a numpy reading of the definition."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rankseg_jax import metrics
from rankseg_jax.errors import InputError


def definition_scores(preds, labels, n_cls, ignore=255):
    """The definition written out plainly: dataset sums, then per-class ratios, then nanmean."""
    inter = np.zeros(n_cls)
    union = np.zeros(n_cls)
    gt = np.zeros(n_cls)
    for pred, label in zip(preds, labels, strict=True):
        keep = label != ignore
        for c in range(n_cls):
            p, g = (pred == c) & keep, (label == c) & keep
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
            gt[c] += g.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / gt
    return inter.sum() / gt.sum(), np.nanmean(iou), np.nanmean(acc), iou, acc


def accumulate(preds, labels, n_cls, ignore=255):
    meter = metrics.MeanIoU(n_cls)
    for pred, label in zip(preds, labels, strict=True):
        counts = metrics.batch_counts(
            pred[None],
            label[None],
            np.ones((1,) + label.shape, bool),
            n_cls=n_cls,
            ignore_index=ignore,
        )
        meter.update(counts)
    return meter.result()


def test_matches_official_miou(official):
    """aAcc/mIoU/mAcc and per-class IoU/Acc (NaN classes included) equal mmseg's eval_metrics."""
    preds = np.load(official / "miou_pred.npy")
    labels = np.load(official / "miou_label.npy")
    ref = json.loads((official / "miou.json").read_text())
    res = accumulate(preds, labels, ref["num_classes"], ref["ignore_index"])
    for key in ("aAcc", "mIoU", "mAcc"):
        assert res[key] == pytest.approx(ref[key], abs=1e-12), key
        assert res["summary"][key] == ref["mmseg_summary"][key], key
    for key in ("IoU", "Acc"):
        ours = np.array(res[key], float)
        theirs = np.array([math.nan if v is None else v for v in ref[key]], float)
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=key)
        np.testing.assert_allclose(ours, theirs, atol=1e-12, equal_nan=True, err_msg=key)
    assert math.isnan(res["Acc"][7])  # class 7 is never labelled


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_with_absent_classes(seed):
    """Random predictions/labels where some classes are absent from GT, pred or both."""
    rng = np.random.default_rng(seed)
    n_cls = 9
    preds, labels = [], []
    h, w = 17, 23  # one shape: one compilation
    for _ in range(4):
        label = rng.choice([0, 1, 2, 4, 255], size=(h, w)).astype(np.int32)  # 3, 5.. never labelled
        pred = rng.choice([0, 1, 3, 4, 6], size=(h, w)).astype(np.int32)  # 2, 5.. never predicted
        preds.append(pred)
        labels.append(label)
    res = accumulate(preds, labels, n_cls)
    aacc, miou, macc, iou, acc = definition_scores(preds, labels, n_cls)
    assert res["aAcc"] == pytest.approx(aacc, abs=1e-12)
    assert res["mIoU"] == pytest.approx(miou, abs=1e-12)
    assert res["mAcc"] == pytest.approx(macc, abs=1e-12)
    np.testing.assert_allclose(res["IoU"], iou, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(res["Acc"], acc, atol=1e-12, equal_nan=True)
    assert math.isnan(res["IoU"][5]) and math.isnan(res["Acc"][3])  # both absent / never labelled
    for pred, label in zip(preds, labels, strict=True):
        device = metrics.batch_counts(pred, label, np.ones(pred.shape, bool), n_cls=n_cls)
        np.testing.assert_array_equal(device, metrics.counts_numpy(pred, label, n_cls))


def test_valid_mask_and_out_of_range_follow_histc():
    """Masked pixels are dropped; labels outside [0, n) count in no GT bin (torch.histc)."""
    pred = np.array([[0, 1, 2, 1]])
    label = np.array([[0, 7, 255, 1]])
    valid = np.array([[True, True, True, False]])
    counts = np.asarray(metrics.intersect_and_union(pred, label, 3, 255, valid))
    np.testing.assert_array_equal(counts, [[1, 0, 0], [1, 1, 0], [1, 0, 0]])


def test_int64_totals_beyond_int32():
    """Summing per-batch int32 counts past 2^31 pixels stays exact in the int64 accumulator."""
    meter = metrics.MeanIoU(2)
    batch = np.array([[2**30, 0], [2**30, 1], [2**30 + 5, 0]], np.int32)
    for _ in range(8):
        meter.update(batch)
    assert meter.counts.dtype == np.int64
    assert meter.counts[2, 0] == 8 * (2**30 + 5)
    res = meter.result()
    assert res["num_pixels"] == 8 * (2**30 + 5)
    assert res["aAcc"] == pytest.approx(2**30 / (2**30 + 5), abs=1e-15)
    assert res["IoU"][0] == pytest.approx(2**30 / (2**30 + 5), abs=1e-15)


def test_reduce_zero_label_matches_mmseg():
    raw = np.array([0, 1, 2, 150, 255], np.uint8)
    np.testing.assert_array_equal(metrics.reduce_zero_label(raw), [255, 0, 1, 149, 255])


def test_topk_recall_mean_over_images():
    """Pixel/image recall per image, averaged over images; images without valid pixels skipped."""
    meter = metrics.TopkRecall()
    meter.update(np.array([1, 0, 1, 0], bool), np.array([6, 2, 2, 0]))  # pix 0.8, img 2/3
    meter.update(np.array([0, 1, 0, 0], bool), np.array([0, 1, 0, 3]))  # pix 0.25, img 0.5
    meter.update(np.array([1, 1, 1, 1], bool), np.zeros(4, int))  # no valid pixel: skipped
    res = meter.result()
    assert res["pixel_recall"] == pytest.approx((0.8 + 0.25) / 2)
    assert res["image_recall"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert res["num_images"] == 2
    assert res["mean_selected"] == pytest.approx((2 + 1 + 4) / 3)


def test_table_and_json(tmp_path):
    meter = metrics.MeanIoU(3, ["wall", "floor", "sky"])
    meter.update(np.array([[2, 0, 0], [3, 0, 1], [2, 0, 2]]))
    res = meter.result()
    table = metrics.format_table(res)
    assert "wall" in table and "nan" in table and "mIoU 33.33" in table
    path = metrics.write_json(res, tmp_path / "out" / "results.json")
    back = json.loads(path.read_text())
    assert back["IoU"][1] is None and back["summary"]["mIoU"] == res["summary"]["mIoU"]


def test_bad_counts_shape_is_clear():
    with pytest.raises(InputError, match=r"shape \(3, 4\)"):
        metrics.MeanIoU(4).update(np.zeros((3, 5)))
