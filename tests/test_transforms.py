"""Tests of the mmseg-equivalent augmentation (rankseg_jax/data/transforms.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rankseg_jax.data import transforms as T

IGNORE = 255


class RecordingRng:
    """Forwards to a real Generator and records every (method, args, result)."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)
        self.calls: list[tuple[str, tuple, object]] = []

    def __getattr__(self, name):
        method = getattr(self._rng, name)

        def call(*args, **kwargs):
            result = method(*args, **kwargs)
            self.calls.append((name, args, result))
            return result

        return call


def blocky_label(h: int, w: int, block: int, n_cls: int, seed: int, ignore_frac: float = 0.1):
    """int32 (h, w) of square blocks with random classes and some ignore blocks."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(0, n_cls, (h // block + 1, w // block + 1))
    grid[rng.random(grid.shape) < ignore_frac] = IGNORE
    return np.kron(grid, np.ones((block, block), np.int64))[:h, :w].astype(np.int32)


def coded_image(label: np.ndarray) -> np.ndarray:
    """RGB uint8 whose channel 0 encodes the label (class c -> 3c + 1, ignore -> 250)."""
    code = np.where(label == IGNORE, 250, 3 * label + 1).astype(np.uint8)
    return np.stack([code, 255 - code, np.full_like(code, 77)], axis=-1)


# ------------------------------------------------------------------ rescale


@pytest.mark.parametrize(
    "w, h, scale, expected",
    [
        (683, 512, (2048, 512), (683, 512)),  # factor 1
        (683, 512, (1024, 256), (342, 256)),  # 341.5 + 0.5 -> 342
        (100, 50, (2048, 512), (1024, 512)),  # short side limits: factor 10.24
        (300, 1000, (2048, 512), (512, 1707)),  # 1706.67 + 0.5 -> 1707
        (3000, 500, (2048, 512), (2048, 341)),  # long side limits: 341.33 -> 341
        (3, 2, (5, 3), (5, 3)),  # factor 1.5: 4.5 + 0.5 -> 5
        (512, 683, (1536, 384), (384, 512)),  # portrait: 512.25 -> 512
    ],
)
def test_rescale_size_table(w, h, scale, expected):
    assert T.rescale_size(w, h, scale) == expected
    out = T.imrescale(np.zeros((h, w, 3), np.uint8), scale)
    assert out.shape == (expected[1], expected[0], 3)
    lab = T.imrescale(np.zeros((h, w), np.int32), scale, nearest=True)
    assert lab.shape == (expected[1], expected[0]) and lab.dtype == np.int32


def test_random_scale_range():
    rng = np.random.default_rng(0)
    scales = np.array([T.random_scale(rng, (2048, 512), (0.5, 2.0)) for _ in range(2000)])
    assert scales[:, 0].min() >= 1024 and scales[:, 0].max() <= 4096
    assert scales[:, 1].min() >= 256 and scales[:, 1].max() <= 1024
    # both sides use the same ratio: long = 4 * short up to int truncation
    assert np.all(np.abs(scales[:, 0] - 4 * scales[:, 1]) <= 4)


# ------------------------------------------------------------------ crop


def test_crop_is_balanced_cases():
    two = np.array([0] * 74 + [1] * 26, np.int32)
    assert T.crop_is_balanced(two, IGNORE, 0.75)
    assert not T.crop_is_balanced(np.array([0] * 75 + [1] * 25, np.int32), IGNORE, 0.75)
    assert not T.crop_is_balanced(np.zeros(100, np.int32), IGNORE, 0.75)
    assert not T.crop_is_balanced(np.array([3] * 10 + [IGNORE] * 90, np.int32), IGNORE, 0.75)
    with_ignore = np.array([0] * 70 + [1] * 30 + [IGNORE] * 1000, np.int32)
    assert T.crop_is_balanced(with_ignore, IGNORE, 0.75)


def test_eleventh_crop_used_unchecked_after_ten_failures():
    label = np.full((100, 120), 4, np.int32)  # one class: every crop fails the check
    rng = RecordingRng(3)
    box = T.random_crop_box(label, rng, (32, 32), 0.75, IGNORE)
    draws = [int(r) for name, _, r in rng.calls if name == "integers"]
    assert len(draws) == 2 * (T.CROP_TRIES + 1)  # 11 (offset_h, offset_w) draws
    assert box == (draws[-2], draws[-2] + 32, draws[-1], draws[-1] + 32)


def test_first_balanced_crop_is_kept():
    label = blocky_label(64, 64, 4, 5, seed=1, ignore_frac=0.0)  # every 32-crop is balanced
    rng = RecordingRng(5)
    box = T.random_crop_box(label, rng, (32, 32), 0.75, IGNORE)
    draws = [int(r) for name, _, r in rng.calls if name == "integers"]
    assert len(draws) == 2 and box == (draws[0], draws[0] + 32, draws[1], draws[1] + 32)


def test_cat_max_ratio_accepts_only_balanced_or_eleventh():
    # Left 3/4 one class, right quarter mixed: many crops fail, some pass.
    label = np.zeros((64, 256), np.int32)
    label[:, 192:] = blocky_label(64, 64, 8, 4, seed=2, ignore_frac=0.2) + 1
    label[label == IGNORE + 1] = IGNORE
    seen_fallback = 0
    for seed in range(200):
        rng = RecordingRng(seed)
        y1, y2, x1, x2 = T.random_crop_box(label, rng, (64, 64), 0.75, IGNORE)
        n_draws = sum(name == "integers" for name, _, _ in rng.calls) // 2
        balanced = T.crop_is_balanced(label[y1:y2, x1:x2], IGNORE, 0.75)
        assert balanced or n_draws == T.CROP_TRIES + 1
        seen_fallback += n_draws == T.CROP_TRIES + 1
    assert seen_fallback < 200  # the check does accept crops here


def test_crop_never_exceeds_image():
    rng = np.random.default_rng(0)
    label = blocky_label(20, 50, 4, 3, seed=0)
    image = coded_image(label)
    for _ in range(20):
        img, lab = T.random_crop(image, label, rng, (32, 32), 0.75, IGNORE)
        assert img.shape == (20, 32, 3) and lab.shape == (20, 32)


# ------------------------------------------------------------------ labels and alignment


def test_label_values_stay_in_source_set_after_every_step():
    label = blocky_label(90, 130, 7, 9, seed=4)
    image = coded_image(label)
    allowed = set(np.unique(label)) | {IGNORE}
    for seed in range(30):
        rng = np.random.default_rng(seed)
        img, lab = T.random_rescale(image, label, rng, (256, 64), (0.5, 2.0))
        assert set(np.unique(lab)) <= allowed
        img, lab = T.random_crop(img, lab, rng, (48, 48), 0.75, IGNORE)
        assert set(np.unique(lab)) <= allowed
        img, lab = T.random_flip(img, lab, rng, 0.5)
        assert set(np.unique(lab)) <= allowed
        _, lab = T.pad_to(T.normalize(img, (127.5,) * 3, (127.5,) * 3), lab, (48, 48), IGNORE)
        assert set(np.unique(lab)) <= allowed
    aug = T.TrainAugment(crop_size=(48, 48), img_scale=(256, 64), ignore_index=IGNORE)
    for seed in range(10):
        _, lab = aug(image, label, np.random.default_rng(seed))
        assert lab.dtype == np.int32 and set(np.unique(lab)) <= allowed


def test_crop_and_flip_keep_exact_alignment():
    # Rescale factor exactly 1 (ratio 1, img_scale = image size): alignment must be exact.
    label = blocky_label(60, 80, 5, 12, seed=6)
    image = coded_image(label)
    aug = T.TrainAugment(
        crop_size=(32, 40), img_scale=(80, 60), ratio_range=(1.0, 1.0), photometric=False
    )
    flips = 0
    for seed in range(20):
        img, lab = aug(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(img, coded_image(lab))
        flips += not np.array_equal(img, image[: img.shape[0], : img.shape[1]])
    assert flips > 0


def test_rescale_keeps_alignment_inside_regions():
    # Up to 3x upscaling here. cv2 nearest samples src floor(x / f) while bilinear centres on
    # (x + 0.5) / f - 0.5, up to f / 2 output pixels apart, so compare only pixels whose 5x5
    # label neighbourhood is uniform; there the bilinear image is exactly the region's value.
    label = blocky_label(64, 96, 16, 12, seed=7, ignore_frac=0.0)
    image = coded_image(label)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        img, lab = T.random_rescale(image, label, rng, (384, 96), (0.5, 2.0))
        assert img.shape[:2] == lab.shape
        pad = np.pad(lab, 2, mode="edge")
        h, w = lab.shape
        uniform = np.ones_like(lab, bool)
        for dy in range(5):
            for dx in range(5):
                uniform &= pad[dy : dy + h, dx : dx + w] == lab
        assert uniform.sum() > 0.5 * lab.size
        np.testing.assert_array_equal(img[..., 0][uniform], coded_image(lab)[..., 0][uniform])


# ------------------------------------------------------------------ photometric


def _hue_ring() -> np.ndarray:
    """RGB (1, 180, 3) of every cv2 hue at full saturation and value."""
    hsv = np.stack([np.arange(180), np.full(180, 255), np.full(180, 255)], -1)
    return cv2.cvtColor(hsv[None].astype(np.uint8), cv2.COLOR_HSV2RGB)


def test_hue_deltas_are_integers_in_minus18_to_17():
    ring = _hue_ring()
    hue_in = cv2.cvtColor(ring, cv2.COLOR_RGB2HSV)[0, :, 0].astype(int)
    assert np.array_equal(hue_in, np.arange(180))  # exact round trip: deltas are observable
    rng = np.random.default_rng(0)
    deltas, applied = [], 0
    for _ in range(10_000):
        out = T.hue(ring, rng)
        if out is ring:
            continue
        applied += 1
        hue_out = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)[0, :, 0].astype(int)
        shift = (hue_out - hue_in + 90) % 180 - 90
        assert np.all(shift == shift[0])
        deltas.append(int(shift[0]))
    assert min(deltas) == -18 and max(deltas) == 17
    assert set(deltas) == set(range(-18, 18))
    assert abs(applied / 10_000 - 0.5) < 0.02


def test_each_photometric_substep_applied_half_the_time(monkeypatch):
    counts = {name: 0 for name in ("brightness", "contrast", "saturation", "hue")}
    orders: dict[tuple[str, ...], int] = {}
    calls: list[str] = []
    for name in counts:
        original = getattr(T, name)

        def wrapped(image, rng, _name=name, _original=original):
            out = _original(image, rng)
            calls.append(_name)
            counts[_name] += out is not image  # sub-steps return their input when skipped
            return out

        monkeypatch.setattr(T, name, wrapped)
    rng = np.random.default_rng(1)
    image = np.random.default_rng(2).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    n = 10_000
    for _ in range(n):
        calls.clear()
        T.photo_metric_distortion(image, rng)
        orders[tuple(calls)] = orders.get(tuple(calls), 0) + 1
    for name, count in counts.items():
        assert abs(count / n - 0.5) < 0.02, (name, count)
    early = ("brightness", "contrast", "saturation", "hue")
    late = ("brightness", "saturation", "hue", "contrast")
    assert set(orders) == {early, late}
    assert abs(orders[early] / n - 0.5) < 0.02


def _mmseg_photometric_bgr(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg 0.x PhotoMetricDistortion transliterated: BGR uint8, cv2 BGR<->HSV."""

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=rng.uniform(0.5, 1.5))
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if rng.integers(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + rng.integers(-18, 18)) % 180
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


def test_photometric_on_rgb_equals_reference_on_bgr():
    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    for seed in range(200):
        ours = T.photo_metric_distortion(rgb, np.random.default_rng(seed))
        ref = _mmseg_photometric_bgr(bgr, np.random.default_rng(seed))
        np.testing.assert_array_equal(ours, ref[..., ::-1])  # bit-exact (tolerance 0)


# ------------------------------------------------------------------ normalise, pad, eval


def _mmcv_imnormalize_rgb(rgb: np.ndarray, mean, std) -> np.ndarray:
    """mmcv.imnormalize(bgr, mean, std, to_rgb=True) as written: cv2 in-place ops."""
    img = np.ascontiguousarray(rgb[..., ::-1]).astype(np.float32)
    mean64 = np.float64(np.array(mean).reshape(1, -1))
    stdinv = 1 / np.float64(np.array(std).reshape(1, -1))
    cv2.cvtColor(img, cv2.COLOR_BGR2RGB, img)
    cv2.subtract(img, mean64, img)
    cv2.multiply(img, stdinv, img)
    return img


@pytest.mark.parametrize(
    "mean, std",
    [((127.5,) * 3, (127.5,) * 3), ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))],
)
def test_normalize_bit_identical_to_mmcv(mean, std):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 127, 1]]
    ours = T.normalize(rgb, mean, std)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, _mmcv_imnormalize_rgb(rgb, mean, std))


def test_pad_to_fills_zero_and_ignore():
    img = np.ones((5, 7, 3), np.float32)
    lab = np.zeros((5, 7), np.int32)
    pimg, plab = T.pad_to(img, lab, (8, 9), IGNORE)
    assert pimg.shape == (8, 9, 3) and plab.shape == (8, 9)
    assert np.all(pimg[5:] == 0) and np.all(pimg[:, 7:] == 0) and np.all(pimg[:5, :7] == 1)
    assert (
        np.all(plab[5:] == IGNORE) and np.all(plab[:, 7:] == IGNORE) and np.all(plab[:5, :7] == 0)
    )


def test_train_augment_is_pure_function_of_seed():
    label = blocky_label(70, 90, 6, 8, seed=9)
    image = coded_image(label)
    aug = T.TrainAugment(crop_size=(40, 40), img_scale=(180, 45))
    a = T.reference_train_transform(
        image, label, np.random.default_rng(11), aug, (127.5,) * 3, (127.5,) * 3
    )
    b = T.reference_train_transform(
        image, label, np.random.default_rng(11), aug, (127.5,) * 3, (127.5,) * 3
    )
    c = T.reference_train_transform(
        image, label, np.random.default_rng(12), aug, (127.5,) * 3, (127.5,) * 3
    )
    assert a[0].shape == (40, 40, 3) and a[0].dtype == np.float32 and a[1].shape == (40, 40)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_eval_transform_keep_ratio_resize():
    image = np.random.default_rng(0).integers(0, 256, (50, 75, 3), dtype=np.uint8)
    out = T.eval_transform(image, (2048, 512), (127.5,) * 3, (127.5,) * 3)
    assert out.shape == (512, 768, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    expected = T.normalize(
        cv2.resize(image, (768, 512), interpolation=cv2.INTER_LINEAR), (127.5,) * 3, (127.5,) * 3
    )
    np.testing.assert_array_equal(out, expected)
