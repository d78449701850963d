"""Sliding-window evaluation throughput on generated ADE-sized images held in memory as uint8.

The timed path is the project's one evaluation loop (`evaluation.run_evaluation`, as training,
--mode=eval and the notebook run it): the eval pipeline's keep-ratio rescale to the test scale,
normalise, fixed-size window batches, canvas merge, bilinear resize back to the original size,
argmax and the per-image confusion counts (mIoU), with compilations counted. Compilation is
excluded by a warm-up pass over one image of each size. JPEG decoding (cv2, one core) is
measured separately on photo-like JPEGs of the same sizes. One JSON line per measurement.

    # CPU target config (ViT-S/16 mask head, crop 256, 2 pinned threads) against PyTorch:
    python benchmarks/eval.py --compare-torch
    # GPU row of issue 9: ViT-B/16 RankSeg at 512, bf16, 2000 ADE-sized images:
    python benchmarks/eval.py --variant B/16 --head rankseg --resolution 512 --dtype bfloat16 \
        --images 2000 --window-batch 16

With --compare-torch the PyTorch reference (eager, SDPA, same threads) runs `slide_inference`
(+ argmax and np.bincount confusion counts) on the same images; the first image's predictions
are asserted equal (≥ 99.9 % of pixels: argmax near-ties may flip) before timing.
"""

from __future__ import annotations

import argparse
import time

from common import (  # type: ignore[import-not-found]
    BenchmarkError,
    add_model_flags,
    apply_cpu_target,
    device_info,
    emit,
    load_config,
    pin_cores,
    versions,
)

# (width, height) of typical ADE20K images (as benchmarks/input_pipeline.py).
ADE_SIZES = ((683, 512), (512, 683), (512, 512), (640, 480), (768, 512), (512, 384), (910, 512))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_flags(parser)
    parser.add_argument("--images", type=int, default=None, help="default 2000 (CPU target: 7)")
    parser.add_argument("--window-batch", type=int, default=None)
    parser.add_argument("--stride", type=int, default=None, help="default: the crop (reference)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    apply_cpu_target(args)
    if args.images is None:
        args.images = len(ADE_SIZES) if args.compare_torch else 2000
    return args


def generated_images(n: int, n_cls: int, seed: int):
    """n (uint8 RGB (H, W, 3), label (H, W) int32 with 255 = ignore) pairs, cycling ADE sizes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = ADE_SIZES[i % len(ADE_SIZES)]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, n_cls, (h, w)).astype(np.int32)
        label[rng.random((h, w)) < 0.05] = 255
        out.append((image, label))
    return out


def jpeg_decode_record(seed: int, per_size: int = 4) -> dict:
    """cv2.imdecode of photo-like quality-90 JPEGs of the ADE sizes: ms per image, one core."""
    import cv2
    import numpy as np
    from input_pipeline import photo_like  # type: ignore[import-not-found]

    rng = np.random.default_rng(seed)
    blobs = [
        cv2.imencode(".jpg", photo_like(rng, w, h), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
        for w, h in ADE_SIZES
        for _ in range(per_size)
    ]
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    for blob in blobs:
        cv2.imdecode(blob, cv2.IMREAD_COLOR)
    dt = time.perf_counter() - t0
    return dict(
        benchmark="jpeg_decode",
        images=len(blobs),
        ms_per_image=1e3 * dt / len(blobs),
        images_per_s_per_core=len(blobs) / dt,
        mean_jpeg_kb=float(np.mean([b.size for b in blobs]) / 1024),
    )


def make_inferencer(config, params=None):
    from rankseg_jax.models.segmenter import create_model
    from rankseg_jax.segmentor import Segmentor, init_params

    model = create_model(config.model)
    return Segmentor(config, model, params if params is not None else init_params(model, config))


def run_jax(args, config, segmentor, examples) -> dict:
    from rankseg_jax import evaluation, inference

    config = config.copy_and_resolve_references()
    config.eval.max_images = 0
    config.data.num_workers = 0  # in-memory examples: no worker processes to feed
    warm = evaluation.ArraySource(examples[: len(ADE_SIZES)])
    t0 = time.perf_counter()
    evaluation.run_evaluation(segmentor, config, warm, progress=False)
    warmup_s = time.perf_counter() - t0
    with inference.count_compilations() as compiles:
        result = evaluation.run_evaluation(
            segmentor, config, evaluation.ArraySource(examples), progress=False
        )
    return dict(
        benchmark="eval",
        framework="jax",
        images=len(examples),
        windows=result["windows"],
        eval_time_s=result["eval_time_s"],
        images_per_s=result["images_per_s"],
        windows_per_s=result["windows_per_s"],
        warmup_s_incl_compile=warmup_s,
        compilations_in_timed_pass=len(compiles),
    )


def torch_predict(ref, config, image, label_shape):
    """Reference slide inference of one uint8 image → pred (H0, W0) int64 (numpy)."""
    import numpy as np
    import torch

    from rankseg_jax import inference

    (view, _), = inference.image_passes(
        image, mean=config.data.mean, std=config.data.std, test_scale=config.data.test_scale
    )  # fmt: skip
    x = torch.from_numpy(view.transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        probs = ref.slide_inference(x, tuple(config.eval.crop), tuple(config.eval.stride),
                                    out_size=label_shape)  # fmt: skip
    return probs[0].argmax(0).numpy().astype(np.int64)


def run_torch(config, ref, examples) -> dict:
    import numpy as np

    n_cls = config.model.n_cls
    confusion = np.zeros(n_cls * n_cls, np.int64)
    t0 = time.perf_counter()
    for image, label in examples:
        pred = torch_predict(ref, config, image, label.shape)
        valid = label != 255
        confusion += np.bincount(label[valid] * n_cls + pred[valid], minlength=n_cls * n_cls)
    dt = time.perf_counter() - t0
    return dict(benchmark="eval", framework="torch", images=len(examples), eval_time_s=dt,
                images_per_s=len(examples) / dt)  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    cores = pin_cores(args.threads) if args.threads else None
    import numpy as np  # noqa: F401 - after pinning

    config = load_config(args)
    with config.unlocked():
        crop = tuple(config.model.img_size)
        config.eval.mode = "slide"
        config.eval.crop = crop
        config.eval.stride = (args.stride, args.stride) if args.stride else crop
        if args.window_batch:
            config.eval.window_batch = args.window_batch
    examples = generated_images(args.images, config.model.n_cls, args.seed)
    env = dict(
        cores=cores, variant=config.model.variant, head=config.model.classifier, crop=list(crop),
        dtype=config.model.compute_dtype, window_batch=config.eval.window_batch,
        **device_info(), **versions(),
    )  # fmt: skip
    ref = None
    if args.compare_torch:
        import torch
        import train_step  # type: ignore[import-not-found]

        from rankseg_jax import inference
        from rankseg_jax.models.segmenter import create_model

        torch.set_num_threads(args.threads or 1)
        torch.set_num_interop_threads(1)
        ref = train_step.torch_model(config, args.seed).eval()
        params = train_step.params_from_torch(ref.state_dict(), create_model(config.model), config)
        segmentor = make_inferencer(config, params)
        image, label = examples[0]
        want = torch_predict(ref, config, image, label.shape)
        passes = inference.image_passes(
            image, mean=config.data.mean, std=config.data.std, test_scale=config.data.test_scale
        )
        got = segmentor.inferencer.predict_passes(passes, label.shape).pred
        agree = float(np.mean(got == want))
        if agree < 0.999:
            raise BenchmarkError(f"JAX and torch predictions agree on only {agree:.4%} of pixels")
        env["prediction_agreement"] = agree
    else:
        segmentor = make_inferencer(config)
    mine = run_jax(args, config, segmentor, examples)
    emit(dict(mine, **env))
    emit(dict(jpeg_decode_record(args.seed), **env))
    if ref is not None:
        theirs = run_torch(config, ref, examples)
        emit(dict(theirs, **env))
        ratio = mine["images_per_s"] / theirs["images_per_s"]
        emit(dict(benchmark="eval", comparison="jax_over_torch_images_per_s", ratio=ratio))


if __name__ == "__main__":
    main()
