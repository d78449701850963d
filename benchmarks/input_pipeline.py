"""Throughput of the ADE20K 512 training input pipeline on generated ADE-like JPEGs.

Prints JSON lines: one in-process line (one core: decode + augment ms per image, images/s) and
one line per worker count through grain's mp_prefetch (images/s overall and per worker).

    python benchmarks/input_pipeline.py --workers 1,2 --images 48

The data are random photo-like JPEGs (smooth colour fields + texture, quality 90) with ADE-style
PNG labels (0 = ignore, 1..150), read by a minimal directory reader defined here.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import cv2
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from rankseg_jax.data import pipeline as pl  # noqa: E402
from rankseg_jax.data import transforms as T  # noqa: E402

# (width, height) of typical ADE20K training images.
ADE_SIZES = ((683, 512), (512, 683), (512, 512), (640, 480), (768, 512), (512, 384), (910, 512))


class DirectorySource:
    """images/<name>.jpg + annotations/<name>.png; cv2 decode, ADE reduce_zero_label."""

    n_cls = 150
    ignore_index = 255

    def __init__(self, root: str):
        self.root = pathlib.Path(root)
        self.names = sorted(p.stem for p in (self.root / "images").glob("*.jpg"))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        bgr = cv2.imread(str(self.root / "images" / f"{name}.jpg"), cv2.IMREAD_COLOR)
        raw = cv2.imread(str(self.root / "annotations" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        label = raw.astype(np.int32)
        label[label == 0] = 256  # reduce_zero_label: 0 -> ignore, k -> k - 1
        label -= 1
        label[label == 254] = 255
        return dict(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), label=label, name=name)


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """BGR uint8: smooth colour fields plus texture, so that JPEG sizes resemble photos."""
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3)).astype(np.uint8)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    texture = rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def region_label(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """uint8 ADE-style label: ~20 Voronoi regions with ids 0..150 (0 = unlabelled)."""
    seeds = rng.integers(0, [height, width], (20, 2))
    ids = rng.integers(0, 151, 20)
    small = np.stack(np.mgrid[0:height:8, 0:width:8], -1)
    dist = ((small[:, :, None, :] - seeds[None, None]) ** 2).sum(-1)
    coarse = ids[dist.argmin(-1)].astype(np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_NEAREST)


def generate(root: pathlib.Path, n: int, seed: int = 0) -> None:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = ADE_SIZES[i % len(ADE_SIZES)]
        name = f"ADE_train_{i:08d}"
        cv2.imwrite(
            str(root / "images" / f"{name}.jpg"),
            photo_like(rng, w, h),
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )
        cv2.imwrite(str(root / "annotations" / f"{name}.png"), region_label(rng, w, h))


def ade_config(global_batch: int, workers: int, prefetch: int) -> pl.PipelineConfig:
    """The ADE20K 512 recipe (rankseg-spec.md 4.2)."""
    augment = T.TrainAugment(
        crop_size=(512, 512),
        img_scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        cat_max_ratio=0.75,
        flip_prob=0.5,
        photometric=True,
        ignore_index=255,
    )
    return pl.PipelineConfig(
        seed=0, global_batch=global_batch, augment=augment, num_workers=workers, prefetch=prefetch
    )


def in_process(source: DirectorySource, cfg: pl.PipelineConfig, n: int) -> dict:
    """One core: decode and augmentation time per image, no grain."""
    cv2.setNumThreads(1)
    decode = augment = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        record = pl.read_record(source, i % len(source))
        t1 = time.perf_counter()
        cfg.augment(record["image"], record["label"], pl.augment_rng(cfg.seed, i))
        t2 = time.perf_counter()
        decode, augment = decode + t1 - t0, augment + t2 - t1
    return dict(
        mode="in_process",
        workers=0,
        images=n,
        ms_per_image_decode=round(1e3 * decode / n, 2),
        ms_per_image_augment=round(1e3 * augment / n, 2),
        images_per_s=round(n / (decode + augment), 1),
    )


def with_workers(source: DirectorySource, cfg: pl.PipelineConfig, steps: int) -> dict:
    """End to end through mp_prefetch: numpy uint8 batches as the train loop receives them."""
    warmup = 2 * max(cfg.num_workers, 1)
    ds = pl.train_dataset(source, cfg, process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(warmup):  # worker start-up and first fills
        next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    elapsed = time.perf_counter() - t0
    it.close()
    images = steps * cfg.global_batch
    return dict(
        mode="mp_prefetch" if cfg.num_workers else "grain_threads",
        workers=cfg.num_workers,
        images=images,
        images_per_s=round(images / elapsed, 1),
        images_per_s_per_worker=round(images / elapsed / max(cfg.num_workers, 1), 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=42, help="generated JPEGs")
    parser.add_argument("--in-process", type=int, default=60, help="images timed in-process")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--batch", type=int, default=8, help="process-local batch")
    parser.add_argument("--steps", type=int, default=12, help="timed batches per worker count")
    parser.add_argument("--prefetch", type=int, default=2, help="batches buffered per worker")
    args = parser.parse_args()
    common = dict(bench="input_pipeline", cpu_count=os.cpu_count(), crop=512, batch=args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp), args.images)
        source = DirectorySource(tmp)
        cfg = ade_config(args.batch, 0, args.prefetch)
        print(json.dumps({**common, **in_process(source, cfg, args.in_process)}), flush=True)
        for workers in (int(w) for w in args.workers.split(",") if w.strip()):
            cfg = ade_config(args.batch, workers, args.prefetch)
            print(json.dumps({**common, **with_workers(source, cfg, args.steps)}), flush=True)


if __name__ == "__main__":
    main()
