"""The mmseg 0.x training and test augmentation, reimplemented with numpy and cv2.

Reference: rankseg-spec.md 4.2-4.3 (mmseg `Resize`, `RandomCrop`, `RandomFlip`,
`PhotoMetricDistortion`, `Normalize`, `Pad`, and the test `MultiScaleFlipAug` resize).

Conventions:
- Images are RGB uint8 (H, W, 3); labels int32 (H, W). The reference holds BGR until
  `Normalize(to_rgb=True)`. Every step here is channel-wise except the HSV conversions, where
  cv2's RGB<->HSV on RGB data gives exactly the HSV (and the colours) that its BGR<->HSV gives on
  the same pixels in BGR order, so the results are identical.
- All randomness comes from one `np.random.Generator` passed in; an example's augmentation is a
  pure function of that generator's seed. The draw order is fixed (ratio, crop offsets, flip,
  photometric) but cannot match the reference's global numpy RNG stream, only its distribution.
- cv2 calls are single-image and thread-count agnostic; call `cv2.setNumThreads(1)` in worker
  processes (the pipeline does).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# Reference PhotoMetricDistortion defaults (mmseg 0.x).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
# mmseg RandomCrop: up to this many checked draws, then one more draw is used unchecked.
CROP_TRIES = 10


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `rescale_size` for a keep-ratio (long, short) target: the new (width, height).

    factor = min(long_target / long_side, short_target / short_side), new side =
    int(side * factor + 0.5).
    """
    long_target, short_target = max(scale), min(scale)
    factor = min(long_target / max(height, width), short_target / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def imrescale(array: np.ndarray, scale: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """mmcv `imrescale` (cv2 backend): keep-ratio resize of (H, W[, C]) to fit `scale`.

    Bilinear for images, nearest for labels (`nearest=True`).
    """
    height, width = array.shape[:2]
    new_w, new_h = rescale_size(width, height, scale)
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(array, (new_w, new_h), interpolation=interp)


def random_scale(
    rng: np.random.Generator, img_scale: tuple[int, int], ratio_range: tuple[float, float]
) -> tuple[int, int]:
    """mmseg `Resize._random_sample_ratio`: (int(long * r), int(short * r)), r ~ U(ratio_range)."""
    low, high = ratio_range
    ratio = rng.random() * (high - low) + low
    return int(img_scale[0] * ratio), int(img_scale[1] * ratio)


def random_rescale(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    img_scale: tuple[int, int],
    ratio_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Keep-ratio random rescale: image (H, W, 3) bilinear, label (H, W) nearest."""
    scale = random_scale(rng, img_scale, ratio_range)
    return imrescale(image, scale), imrescale(label, scale, nearest=True)


def _crop_box(
    rng: np.random.Generator, shape: tuple[int, ...], crop_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """mmseg `RandomCrop.get_crop_bbox`: (y1, y2, x1, x2), clipped to the image by slicing."""
    margin_h = max(shape[0] - crop_size[0], 0)
    margin_w = max(shape[1] - crop_size[1], 0)
    offset_h = int(rng.integers(0, margin_h + 1))
    offset_w = int(rng.integers(0, margin_w + 1))
    return offset_h, offset_h + crop_size[0], offset_w, offset_w + crop_size[1]


def crop_is_balanced(label: np.ndarray, ignore_index: int, cat_max_ratio: float) -> bool:
    """The `cat_max_ratio` test: more than one non-ignore class, the largest < ratio of them."""
    counts = np.bincount(label.ravel())
    if ignore_index < counts.size:
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    return counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_box(
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    ignore_index: int,
) -> tuple[int, int, int, int]:
    """mmseg `RandomCrop` box: up to 10 checked draws, then the 11th draw is used unchecked."""
    box = _crop_box(rng, label.shape, crop_size)
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(CROP_TRIES):
        y1, y2, x1, x2 = box
        if crop_is_balanced(label[y1:y2, x1:x2], ignore_index, cat_max_ratio):
            break
        box = _crop_box(rng, label.shape, crop_size)
    return box


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    ignore_index: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop image (H, W, 3) and label (H, W) to at most `crop_size` (h, w) at one box."""
    y1, y2, x1, x2 = random_crop_box(label, rng, crop_size, cat_max_ratio, ignore_index)
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def random_flip(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float
) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of both with probability `prob` (mmseg `RandomFlip`)."""
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def _convert(array: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg `PhotoMetricDistortion.convert`: float32 affine, clip to [0, 255], cast to uint8."""
    out = array.astype(np.float32) * alpha + beta
    return np.clip(out, 0, 255).astype(np.uint8)


def brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With prob 1/2 add U(-32, 32)."""
    if rng.integers(2):
        return _convert(image, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    return image


def contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With prob 1/2 multiply by U(0.5, 1.5)."""
    if rng.integers(2):
        return _convert(image, alpha=rng.uniform(*CONTRAST_RANGE))
    return image


def saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With prob 1/2 scale the cv2 HSV saturation by U(0.5, 1.5) (RGB uint8 in and out)."""
    if rng.integers(2):
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=rng.uniform(*SATURATION_RANGE))
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return image


def hue(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """With prob 1/2 shift the cv2 hue (0..179) by an integer d in [-18, 17], mod 180."""
    if rng.integers(2):
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)
        delta = int(rng.integers(-HUE_DELTA, HUE_DELTA))
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + delta) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return image


def photo_metric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg `PhotoMetricDistortion` (defaults) on RGB uint8 (H, W, 3).

    Order as it runs in mmseg 0.x: brightness; mode = randint(2); mode 1 -> contrast now;
    saturation; hue; mode 0 -> contrast last.
    """
    image = brightness(image, rng)
    mode = rng.integers(2)
    if mode == 1:
        image = contrast(image, rng)
    image = saturation(image, rng)
    image = hue(image, rng)
    if mode == 0:
        image = contrast(image, rng)
    return image


def normalize_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 (256, 3) table of mmcv `imnormalize` for every uint8 value of each channel.

    mmcv computes (x - float32(mean)) in float32 with cv2, then multiplies by 1/std in double
    and rounds to float32. Tabulating that lets the device normalise uint8 images by a gather
    with bit-identical results (plain float32 arithmetic differs in the last bit for ImageNet
    statistics).
    """
    values = np.arange(256, dtype=np.float32)[:, None]
    centred = values - np.asarray(mean, np.float32)[None, :]
    stdinv = 1.0 / np.asarray(std, np.float64)[None, :]
    return (centred.astype(np.float64) * stdinv).astype(np.float32)


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """mmcv `imnormalize` of an RGB uint8 (H, W, 3) image: float32 (x - mean) / std."""
    lut = normalize_lut(mean, std)
    return lut[image, np.arange(3)]


def pad_to(
    image: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg `Pad(size)`: pad bottom/right to (h, w); image with 0, label with `ignore_index`."""
    height, width = label.shape
    pad = ((0, size[0] - height), (0, size[1] - width))
    image = np.pad(image, pad + ((0, 0),), constant_values=0)
    return image, np.pad(label, pad, constant_values=ignore_index)


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """The random part of the reference training pipeline (rescale, crop, flip, photometric).

    Calling it returns the unpadded uint8 crop; `reference_train_transform` adds the
    normalise + pad that the pipeline does on device.
    """

    crop_size: tuple[int, int] = (512, 512)
    img_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = 255

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (H, W, 3) and int32 (H, W) -> the crop (h, w, 3) uint8, (h, w) int32."""
        image, label = random_rescale(image, label, rng, self.img_scale, self.ratio_range)
        image, label = random_crop(
            image, label, rng, self.crop_size, self.cat_max_ratio, self.ignore_index
        )
        image, label = random_flip(image, label, rng, self.flip_prob)
        if self.photometric:
            image = photo_metric_distortion(image, rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(label, dtype=np.int32)


def reference_train_transform(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    augment: TrainAugment,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """The whole reference train pipeline: float32 (ch, cw, 3) normalised + padded, int32 label."""
    image, label = augment(image, label, rng)
    return pad_to(normalize(image, mean, std), label, augment.crop_size, augment.ignore_index)


def eval_resize(image: np.ndarray, test_scale: tuple[int, int]) -> np.ndarray:
    """Test-time keep-ratio resize (bilinear) of RGB uint8 (H, W, 3) to fit `test_scale`."""
    return imrescale(image, test_scale)


def eval_transform(
    image: np.ndarray,
    test_scale: tuple[int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """Test pipeline image: keep-ratio resize, then normalise -> float32 (h, w, 3)."""
    return normalize(eval_resize(image, test_scale), mean, std)
