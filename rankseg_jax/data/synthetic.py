"""A generated dataset in the exact ADEChallengeData2016 layout: demos and tests need no download.

`generate_ade20k(root, n_train, n_val, seed)` writes

    ADEChallengeData2016/images/training/ADE_train_00000001.jpg ...
    ADEChallengeData2016/annotations/training/ADE_train_00000001.png ...
    ADEChallengeData2016/images/validation/ADE_val_00000001.jpg ...
    ADEChallengeData2016/annotations/validation/ADE_val_00000001.png ...
    ADEChallengeData2016/synthetic.json      (the generator's arguments; not read by the reader)

with RGB JPEG images and single-channel uint8 PNG labels where 0 = unlabeled and 1..150 are the
classes, exactly like the real download, so the real ADE20K reader (reduce_zero_label) and the
real pipeline run on it. Same arguments → byte-identical files (on the same OpenCV/numpy).
Example i of a split depends only on (seed, split, i), so a larger dataset extends a smaller one.

Design: learnable, and shaped like the problem RankSeg solves (many classes, few per image).

* 150 classes overall, 3-8 per image. Classes 1..50 are "stuff" (drawn as large regions that
  tile the image, like wall/sky/floor) and 51..150 are "things" (compact shapes on top). Both
  groups are drawn with a long-tailed frequency, as in ADE20K: the first classes of each group
  are ~3-6x more frequent than the last ones, yet every class appears in a few hundred images.
* Every class has a fixed appearance (the same for every seed), chosen so that it survives the
  training augmentation (rescale 0.5-2, crop, flip, brightness/contrast/saturation and hue
  shifts of up to ±36°): a texture family (flat, horizontal / vertical / diagonal stripes,
  checkers, dots, rings, grid, blobs, waves: 10 families), a texture period (5, 9 or 15 px),
  and a pair of colours whose hue is one of 5 groups 72° apart. Classes that share family and
  period differ by hue group, so no two classes differ by hue alone by less than 72°, and
  most differ in texture as well. Things also have a class-specific shape (ellipse,
  rectangle, triangle, diamond or cross), another cue that flips and crops keep.
* Image sizes vary: height and width drawn independently in [min_side, max_side] (96-320 px by
  default), aspect ratio limited to 1:2..2:1.
* Unlabeled (0) pixels, as in ADE20K: in about half the images the 1-px boundaries between
  regions, and in about a third a clutter blob of random colour noise.
* Photo-like nuisances: a random-phase texture per region, a smooth illumination gradient and
  Gaussian pixel noise, then JPEG compression (quality 90).

It is fast: a few hundred images take seconds on one core.
CLI: `python -m rankseg_jax.data.synthetic --root data/synthetic_ade --train 400 --val 100`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import dataclass

import cv2
import numpy as np

from rankseg_jax.errors import DatasetError

ADE_DIRNAME = "ADEChallengeData2016"
MANIFEST = "synthetic.json"
GENERATOR_VERSION = 1
N_CLASSES = 150
N_STUFF = 50
SPLITS = (("training", "train", 0), ("validation", "val", 1))
_PERIODS = (5.0, 9.0, 15.0)
_N_FAMILIES = 10
_N_SHAPES = 5
_JPEG_QUALITY = 90


@dataclass(frozen=True)
class ClassStyle:
    """How class `cls` (0-based; raw label cls + 1) is drawn."""

    cls: int
    family: int  # texture family 0..9 (see _texture); 0 = flat bg colour
    period: float  # texture period in px
    fg: tuple[int, int, int]  # RGB
    bg: tuple[int, int, int]  # RGB
    shape: int  # things only: 0 ellipse, 1 rectangle, 2 triangle, 3 diamond, 4 cross


def _hsv_to_rgb(hue_deg: float, sat: float, val: float) -> tuple[int, int, int]:
    hsv = np.array([[[hue_deg, sat, val]]], np.float32)  # float HSV: H in degrees, S, V in 0..1
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0] * 255.0
    r, g, b = (int(round(float(v))) for v in np.clip(rgb, 0, 255))
    return r, g, b


def class_styles() -> tuple[ClassStyle, ...]:
    """The fixed appearance of the 150 classes (independent of the seed)."""
    styles = []
    for c in range(N_CLASSES):
        # A fixed permutation of the style table, so that stuff (1..50) and things (51..150)
        # both get every texture family, period and hue group.
        s = (c * 7) % N_CLASSES
        family = s % _N_FAMILIES
        p_idx = (s // _N_FAMILIES) % len(_PERIODS)
        period = _PERIODS[p_idx]
        group = s // (_N_FAMILIES * len(_PERIODS))  # 0..4, hue group 72° apart
        hue = (group * 72.0 + family * 7.0) % 360.0
        light = 0.95 if (s // 3) % 2 == 0 else 0.75
        fg = _hsv_to_rgb(hue, 0.85, light)
        bg = _hsv_to_rgb((hue + 24.0) % 360.0, 0.55, 0.35)
        if family == 0:  # flat: no period, so the period slot picks saturation and value
            bg = _hsv_to_rgb(hue, (0.9, 0.5, 0.2)[p_idx], (0.9, 0.7, 0.5)[p_idx])
        styles.append(ClassStyle(c, family, period, fg, bg, (c * 3) % _N_SHAPES))
    return tuple(styles)


STYLES = class_styles()


def _frequency_weights(n: int, tail: float) -> np.ndarray:
    w = 1.0 / (1.0 + np.arange(n) / tail)
    return w / w.sum()


_P_STUFF = _frequency_weights(N_STUFF, 10.0)
_P_THINGS = _frequency_weights(N_CLASSES - N_STUFF, 40.0)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) float32 smooth noise in [0, 1]: a coarse random grid resized bilinearly."""
    gh, gw = max(2, int(round(h / cells))), max(2, int(round(w / cells)))
    grid = rng.random((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)


def _texture(style: ClassStyle, rng: np.random.Generator, h: int, w: int, scale: float):
    """(h, w) bool texture of `style` over a box of size h x w, with a random phase."""
    p = style.period * scale
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y += rng.uniform(0, p)
    x += rng.uniform(0, p)
    frac = lambda v: v - np.floor(v)
    f = style.family
    if f == 0:
        return np.zeros((h, w), bool)
    if f == 1:
        return frac(y / p) < 0.5
    if f == 2:
        return frac(x / p) < 0.5
    if f == 3:
        return frac((x + y) / (p * 1.414)) < 0.5
    if f == 4:
        return ((np.floor(x / p) + np.floor(y / p)) % 2) == 1
    if f == 5:
        return (frac(x / p) - 0.5) ** 2 + (frac(y / p) - 0.5) ** 2 < 0.09
    if f == 6:
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
        r = np.sqrt((y - y[0, 0] - cy) ** 2 + (x - x[0, 0] - cx) ** 2)
        return frac(r / p) < 0.5
    if f == 7:
        return (frac(x / p) < 0.3) | (frac(y / p) < 0.3)
    if f == 8:
        return _smooth_noise(rng, h, w, max(2, int(p * 0.6))) > 0.5
    return frac((y + 0.35 * p * np.sin(2 * np.pi * x / (3 * p))) / p) < 0.5


def _shape_polygon(shape: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(N, 2) int32 polygon of a thing shape centred at (cx, cy) with radius r."""
    if shape == 0:  # ellipse
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), 0.65 * np.sin(t)], -1)
    elif shape == 1:  # rectangle
        pts = np.array([[-1, -0.6], [1, -0.6], [1, 0.6], [-1, 0.6]], np.float64)
    elif shape == 2:  # triangle
        t = np.array([90, 210, 330]) * np.pi / 180
        pts = np.stack([np.cos(t), np.sin(t)], -1)
    elif shape == 3:  # diamond
        pts = np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], np.float64)
    else:  # cross
        a, b = 1.0, 0.35
        pts = np.array(
            [[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
             [-a, b], [-a, -b], [-b, -b]],
            np.float64,
        )  # fmt: skip
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T * r + np.array([cx, cy])
    return np.round(pts).astype(np.int32)


def _layout(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) uint8 raw label (1..150) with 3-8 classes: stuff regions, then thing shapes."""
    n = int(rng.integers(3, 9))
    n_stuff = int(rng.integers(1, min(3, n - 1) + 1))
    stuff = rng.choice(N_STUFF, n_stuff, replace=False, p=_P_STUFF)
    things = N_STUFF + rng.choice(N_CLASSES - N_STUFF, n - n_stuff, replace=False, p=_P_THINGS)
    label = np.empty((h, w), np.uint8)
    if n_stuff == 1:
        label[:] = stuff[0] + 1
    else:
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        warp = (_smooth_noise(rng, h, w, 48) - 0.5) * 0.5 * min(h, w)
        dists = []
        for _ in range(n_stuff):
            sy, sx = rng.uniform(0, h), rng.uniform(0, w)
            dists.append(np.hypot(y - sy, x - sx) + warp * rng.uniform(-1, 1))
        label[:] = (stuff + 1).astype(np.uint8)[np.argmin(np.stack(dists), 0)]
    radii = np.sort(rng.uniform(0.12, 0.3, len(things)))[::-1] * min(h, w)
    for cls, r in zip(things, radii, strict=True):
        cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
        poly = _shape_polygon(STYLES[cls].shape, cx, cy, r, rng.uniform(0, np.pi))
        cv2.fillPoly(label, [poly], int(cls) + 1)
    return label


def _render(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB image of a raw label map: class textures, light, noise."""
    h, w = label.shape
    image = np.zeros((h, w, 3), np.float32)
    scale = rng.uniform(0.85, 1.15)
    for raw in np.unique(label):
        if raw == 0:
            continue
        style = STYLES[int(raw) - 1]
        ys, xs = np.nonzero(label == raw)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        tex = _texture(style, rng, y1 - y0, x1 - x0, scale)
        colours = np.where(tex[..., None], np.float32(style.fg), np.float32(style.bg))
        box = label[y0:y1, x0:x1] == raw
        image[y0:y1, x0:x1][box] = colours[box]
    gy, gx = rng.uniform(-1, 1, 2)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1.0 + 0.12 * (gy * (y / h - 0.5) + gx * (x / w - 0.5)) * 2
    image = image * light[..., None] + rng.normal(0.0, 5.0, (h, w, 3)).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _unlabel(rng: np.random.Generator, label: np.ndarray, image: np.ndarray) -> None:
    """Mark some pixels unlabeled (0), in place: region boundaries and a clutter blob."""
    h, w = label.shape
    if rng.random() < 0.5:
        edge = np.zeros((h, w), bool)
        edge[:, 1:] |= label[:, 1:] != label[:, :-1]
        edge[1:, :] |= label[1:, :] != label[:-1, :]
        label[edge] = 0
    if rng.random() < 0.33:
        blob = np.zeros((h, w), np.uint8)
        r = rng.uniform(0.06, 0.12) * min(h, w)
        poly = _shape_polygon(0, rng.uniform(0, w), rng.uniform(0, h), r, rng.uniform(0, np.pi))
        cv2.fillPoly(blob, [poly], 1)
        mask = blob.astype(bool)
        label[mask] = 0
        image[mask] = rng.integers(0, 256, (int(mask.sum()), 3), dtype=np.uint8)


def make_example(seed: int, split_code: int, index: int, min_side: int = 96, max_side: int = 320):
    """One generated (image (H, W, 3) uint8 RGB, raw label (H, W) uint8) pair.

    It depends only on its arguments. Each of its 3-8 classes covers at least 0.4 % of the
    image (and 16 px), so every class an image lists is visible.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index]))
    while True:
        h = int(rng.integers(min_side, max_side + 1))
        w = int(rng.integers(max(min_side, (h + 1) // 2), min(max_side, 2 * h) + 1))
        label = _layout(rng, h, w)
        image = _render(rng, label)
        _unlabel(rng, label, image)
        counts = np.bincount(label.ravel(), minlength=N_CLASSES + 1)[1:]
        present = counts[counts > 0]
        if 3 <= len(present) <= 8 and present.min() >= max(16, 0.004 * h * w):
            return image, label


def _write_png(path: str, array: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise DatasetError(f"{path}: PNG encoding failed")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def _write_jpeg(path: str, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    if not ok:
        raise DatasetError(f"{path}: JPEG encoding failed")
    with open(path, "wb") as f:
        f.write(data.tobytes())


def ade_dir(root: str | os.PathLike) -> str:
    """root itself when it is named ADEChallengeData2016, else root/ADEChallengeData2016."""
    root = os.path.abspath(root)
    return root if os.path.basename(root) == ADE_DIRNAME else os.path.join(root, ADE_DIRNAME)


def _manifest(n_train, n_val, seed, val_seed, min_side, max_side) -> dict:
    return dict(
        generator="rankseg_jax.data.synthetic",
        version=GENERATOR_VERSION,
        n_train=n_train,
        n_val=n_val,
        seed=seed,
        val_seed=val_seed,
        min_side=min_side,
        max_side=max_side,
    )


def generate_ade20k(
    root: str | os.PathLike,
    n_train: int,
    n_val: int,
    seed: int = 0,
    *,
    val_seed: int | None = None,
    min_side: int = 96,
    max_side: int = 320,
) -> str:
    """Write the generated dataset under `root` and return its ADEChallengeData2016 path.

    `root` may be the parent (data/synthetic_ade) or the ADEChallengeData2016 folder itself
    (the synthetic_ade20k config's data.root). Validation images use `val_seed` (default:
    `seed`; the split is part of every example's seed, so the splits never share images).
    The files are written to a temporary folder next to the target and moved in place, so a
    killed run never leaves a half-written dataset; an existing generated dataset there is
    replaced, anything else raises DatasetError.
    """
    if n_train < 0 or n_val < 0 or not 16 <= min_side <= max_side:
        raise DatasetError(
            f"generate_ade20k: bad sizes n_train={n_train}, n_val={n_val}, "
            f"min_side={min_side}, max_side={max_side}"
        )
    val_seed = seed if val_seed is None else val_seed
    target = ade_dir(root)
    if os.path.exists(target) and not os.path.isfile(os.path.join(target, MANIFEST)):
        raise DatasetError(
            f"{target}: exists and is not a generated dataset (no {MANIFEST}); "
            "refusing to overwrite it"
        )
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{ADE_DIRNAME}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"training": n_train, "validation": n_val}
    for split, prefix, code in SPLITS:
        os.makedirs(os.path.join(tmp, "images", split))
        os.makedirs(os.path.join(tmp, "annotations", split))
        split_seed = seed if code == 0 else val_seed
        for i in range(counts[split]):
            image, label = make_example(split_seed, code, i, min_side, max_side)
            stem = f"ADE_{prefix}_{i + 1:08d}"
            _write_jpeg(os.path.join(tmp, "images", split, stem + ".jpg"), image)
            _write_png(os.path.join(tmp, "annotations", split, stem + ".png"), label)
    manifest = _manifest(n_train, n_val, seed, val_seed, min_side, max_side)
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def ensure_ade20k(
    root: str | os.PathLike,
    n_train: int,
    n_val: int,
    seed: int = 0,
    *,
    val_seed: int | None = None,
    min_side: int = 96,
    max_side: int = 320,
) -> str:
    """The generated dataset's path, generating it only if it is missing or was made differently."""
    val_seed = seed if val_seed is None else val_seed
    target = ade_dir(root)
    want = _manifest(n_train, n_val, seed, val_seed, min_side, max_side)
    try:
        with open(os.path.join(target, MANIFEST), encoding="utf-8") as f:
            if json.load(f) == want:
                return target
    except (OSError, ValueError):
        pass
    return generate_ade20k(
        root, n_train, n_val, seed, val_seed=val_seed, min_side=min_side, max_side=max_side
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rankseg_jax.data.synthetic",
        description="Write a generated dataset in the ADEChallengeData2016 layout.",
    )
    parser.add_argument("--root", default="data/synthetic_ade", help="parent folder (or the "
                        "ADEChallengeData2016 folder itself)")  # fmt: skip
    parser.add_argument("--train", type=int, default=400, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-seed", type=int, default=None, help="default: --seed")
    parser.add_argument("--min-side", type=int, default=96)
    parser.add_argument("--max-side", type=int, default=320)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = generate_ade20k(
        args.root,
        args.train,
        args.val,
        args.seed,
        val_seed=args.val_seed,
        min_side=args.min_side,
        max_side=args.max_side,
    )
    took = time.perf_counter() - start
    print(f"wrote {args.train} training + {args.val} validation images to {path} in {took:.1f}s")


if __name__ == "__main__":
    main()
