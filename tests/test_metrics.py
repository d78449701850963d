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


# ------------------------------------------------------------------------------------------
# mDice / mFscore / precision / recall and the confusion matrix (issue 16)


def _nan_list(values):
    return np.array([math.nan if v is None else v for v in values], np.float64)


@pytest.mark.parametrize("beta", [1, 2])
def test_dice_fscore_match_official(official, beta):
    """Every per-class value of the fork's eval_metrics, NaN classes included (7: never
    labelled, 9: never predicted), accumulated on device per image."""
    preds = np.load(official / "miou_pred.npy")
    labels = np.load(official / "miou_label.npy")
    ref = json.loads((official / "metrics_dice_fscore.json").read_text())[f"beta{beta}"]
    counts = sum(metrics.counts_numpy(p, t, 12) for p, t in zip(preds, labels, strict=True))
    np.testing.assert_array_equal(
        metrics.scores_from_counts(counts)["IoU"], accumulate(preds, labels, 12)["IoU"]
    )
    got = metrics.extended_scores_from_counts(counts, beta=beta)
    for key in ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall"):
        want = _nan_list(ref[key])
        have = np.array(got[key])
        np.testing.assert_array_equal(np.isnan(have), np.isnan(want), err_msg=key)
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-12, err_msg=key)
    assert got["aAcc"] == pytest.approx(ref["aAcc"][0], abs=1e-12)
    for key in ("Dice", "Fscore", "Precision", "Recall"):
        assert got[f"m{key}"] == pytest.approx(np.nanmean(_nan_list(ref[key])), abs=1e-12)
    # The NaN cases the fixture was built for.
    assert math.isnan(got["Recall"][7]) and math.isnan(got["Fscore"][7]) and got["Dice"][7] == 0
    assert math.isnan(got["Precision"][9]) and got["Recall"][9] == 0


def test_fscore_beta_changes_only_fscore(official):
    preds = np.load(official / "miou_pred.npy")
    labels = np.load(official / "miou_label.npy")
    counts = sum(metrics.counts_numpy(p, t, 12) for p, t in zip(preds, labels, strict=True))
    one = metrics.extended_scores_from_counts(counts, beta=1)
    two = metrics.extended_scores_from_counts(counts, beta=2)
    for key in ("IoU", "Dice", "Precision", "Recall"):
        np.testing.assert_array_equal(one[key], two[key])  # NaNs compare equal here
    # beta = 1 is the Dice coefficient wherever both are defined.
    both = ~np.isnan(np.array(one["Fscore"]))
    np.testing.assert_allclose(np.array(one["Fscore"])[both], np.array(one["Dice"])[both], 1e-12)
    assert not np.allclose(np.array(two["Fscore"])[both], np.array(one["Fscore"])[both])


@pytest.mark.parametrize("seed", [0, 1])
def test_confusion_matrix_sums_equal_iou_counts(seed):
    rng = np.random.default_rng(seed)
    n_cls = 9
    preds = rng.integers(0, n_cls - 1, (3, 17, 23))  # the last class is never predicted
    labels = rng.integers(0, n_cls, (3, 17, 23))
    labels[labels == 4] = 255
    labels[0, :3] = 255
    valid = np.ones(labels.shape, bool)
    valid[2, :, 20:] = False  # padding
    confusion = metrics.ConfusionMatrix(n_cls)
    meter = metrics.MeanIoU(n_cls)
    for b in range(3):
        args = (preds[b : b + 1], labels[b : b + 1], valid[b : b + 1])
        confusion.update(metrics.batch_confusion(*args, n_cls=n_cls))
        meter.update(metrics.batch_counts(*args, n_cls=n_cls))
    assert confusion.matrix.dtype == np.int64
    np.testing.assert_array_equal(confusion.counts(), meter.counts)
    inter, pred, gt = meter.counts
    union = pred + gt - inter
    m = confusion.matrix
    np.testing.assert_array_equal(m.sum(0) + m.sum(1) - np.diag(m), union)
    host = sum(
        metrics.confusion_numpy(np.where(valid[b], preds[b], 0), np.where(valid[b], labels[b], 255),
                                n_cls)
        for b in range(3)
    )  # fmt: skip
    np.testing.assert_array_equal(host, m)
    # Rows are the ground truth: a pixel labelled 0 and predicted 3 lands in m[0, 3].
    one = metrics.confusion_numpy(np.array([[3]]), np.array([[0]]), n_cls)
    assert one[0, 3] == 1 and one.sum() == 1


def test_confusion_save_and_most_confused(tmp_path):
    confusion = metrics.ConfusionMatrix(3, ["a", "b", "c"])
    confusion.update(np.array([[8, 2, 0], [5, 5, 0], [0, 1, 0]]))
    path = confusion.save(tmp_path / "eval" / "confusion.npy")
    loaded = np.load(path)
    assert loaded.dtype == np.int64 and (loaded == confusion.matrix).all()
    pairs = metrics.most_confused(confusion.matrix, top=2)
    assert pairs == [(2, 1, 1.0), (1, 0, 0.5)]
    assert metrics.most_confused(confusion.matrix, top=1, normalise=False) == [(1, 0, 5.0)]
    with pytest.raises(InputError, match=r"\(3, 3\)"):
        confusion.update(np.zeros((2, 2)))


def test_extended_table_names_every_metric():
    counts = np.array([[5, 0], [10, 0], [6, 4]])
    res = metrics.extended_scores_from_counts(counts, beta=2)
    res["class_names"] = ["road", "sky"]
    table = metrics.format_extended_table(res)
    assert "road" in table and "sky" in table and "mFscore" in table and "beta=2" in table
    per_class = metrics.per_class_table(res)
    assert per_class["road"]["Precision"] == pytest.approx(0.5)
    assert per_class["road"]["Recall"] == pytest.approx(5 / 6)
    assert math.isnan(per_class["sky"]["Precision"]) and per_class["sky"]["Recall"] == 0.0
