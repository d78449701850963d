"""A generated dataset in the folder layout: 7 classes, palette PNG labels, and colour masks.

`generate_folder(root, n_train, n_val, seed)` writes

    root/classes.json                      7 names, their palette, ignore_color white
    root/images/{train,val}/<stem>.jpg
    root/annotations/{train,val}/<stem>.png   palette-mode ("P") PNGs: index = class id,
                                              255 = ignore (unlabelled pixels)
    root/images/val_rgb/<stem>.jpg             the val images again, with
    root/annotations/val_rgb/<stem>.png       colour-coded RGB masks (palette colours, white
                                              = ignore)   [color_split=True]

so both label kinds of `FolderSource` run on it (tests, the custom-data template's demo).
The pictures come from `rankseg_jax.data.synthetic`: its region layout, with the regions'
150 ADE ids folded onto 7 classes, each drawn with one fixed texture/colour style, so a small
model learns them in minutes. Same arguments → the same files.
"""

from __future__ import annotations

import argparse
import json
import os

import cv2
import numpy as np
from PIL import Image

from rankseg_jax.data import synthetic
from rankseg_jax.errors import DatasetError

CLASS_NAMES = ("wall", "building", "sky", "floor", "tree", "road", "water")
PALETTE = np.array(
    [[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
     [140, 140, 140], [61, 230, 250]], np.uint8,
)  # fmt: skip
PALETTE.setflags(write=False)
IGNORE_INDEX = 255
IGNORE_COLOR = (255, 255, 255)
COLOR_SPLIT = "val_rgb"


def make_example(
    seed: int, split_code: int, index: int, min_side: int = 64, max_side: int = 160
) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8 RGB, label (H, W) uint8 class ids 0..6, 255 = ignore)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, index, 7]))
    h = int(rng.integers(min_side, max_side + 1))
    w = int(rng.integers(max(min_side, (h + 1) // 2), min(max_side, 2 * h) + 1))
    ade = synthetic._layout(rng, h, w)  # ADE ids 1..150, regions
    folded = (1 + (ade.astype(np.int64) - 1) % len(CLASS_NAMES)).astype(np.uint8)
    image = synthetic._render(rng, folded)  # raw ids 1..7: seven distinct "stuff" styles
    synthetic._unlabel(rng, folded, image)  # 0 = unlabelled
    label = np.where(folded == 0, IGNORE_INDEX, folded.astype(np.int64) - 1).astype(np.uint8)
    return image, label


def _save_palette_png(path: str, label: np.ndarray) -> None:
    img = Image.fromarray(label, mode="P")
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(PALETTE)] = PALETTE
    flat[IGNORE_INDEX] = IGNORE_COLOR
    img.putpalette(flat.ravel().tolist())
    img.save(path)


def color_mask(label: np.ndarray) -> np.ndarray:
    """Class ids (H, W) → the colour-coded RGB mask (H, W, 3) uint8 (ignore = IGNORE_COLOR)."""
    out = np.empty((*label.shape, 3), np.uint8)
    out[:] = IGNORE_COLOR
    keep = label != IGNORE_INDEX
    out[keep] = PALETTE[label[keep]]
    return out


def _write_jpeg(path: str, rgb: np.ndarray) -> None:
    if not cv2.imwrite(path, rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise DatasetError(f"{path}: cannot write the generated image")


def generate_folder(
    root: str | os.PathLike,
    n_train: int = 24,
    n_val: int = 6,
    seed: int = 0,
    *,
    min_side: int = 64,
    max_side: int = 160,
    color_split: bool = True,
) -> str:
    """Write the dataset (layout in the module docstring) under `root`; returns its path."""
    root = os.path.abspath(root)
    splits = [("train", 0, n_train), ("val", 1, n_val)]
    for split, code, count in splits:
        names = [split] + ([COLOR_SPLIT] if split == "val" and color_split else [])
        for name in names:
            os.makedirs(os.path.join(root, "images", name), exist_ok=True)
            os.makedirs(os.path.join(root, "annotations", name), exist_ok=True)
        for i in range(count):
            image, label = make_example(seed, code, i, min_side, max_side)
            stem = f"{split}_{i:05d}"
            for name in names:
                _write_jpeg(os.path.join(root, "images", name, f"{stem}.jpg"), image)
            _save_palette_png(os.path.join(root, "annotations", split, f"{stem}.png"), label)
            if split == "val" and color_split:
                path = os.path.join(root, "annotations", COLOR_SPLIT, f"{stem}.png")
                Image.fromarray(color_mask(label)).save(path)
    spec = {
        "classes": list(CLASS_NAMES),
        "palette": PALETTE.tolist(),
        "ignore_color": list(IGNORE_COLOR),
    }
    with open(os.path.join(root, "classes.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
    return root


def main(argv: list[str] | None = None) -> int:
    """`python -m rankseg_jax.data.folder_demo DIR [--train N] [--val N] [--seed S]`."""
    parser = argparse.ArgumentParser(description="Write the generated 7-class folder dataset.")
    parser.add_argument("root", help="the dataset folder to write (data.root / root=DIR)")
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=30, help="validation images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = generate_folder(args.root, args.train, args.val, args.seed)
    print(f"wrote {args.train} train and {args.val} val images (+ val_rgb colour masks) to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
