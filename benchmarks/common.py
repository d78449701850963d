"""Shared pieces of the benchmarks: core pinning, configs, timing, JSON lines, torch pairing.

Pinning must happen before jax or torch start their thread pools, so `pin_cores` is called
from each script's `main` before the heavy imports (they live inside functions here).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The CPU target of issue 9: Segmenter ViT-S/16 (mask head) at 256×256, batch 2, float32.
CPU_TARGET = dict(variant="S/16", head="mask", resolution=256, batch=2, dtype="float32", threads=2)


class BenchmarkError(ValueError):
    """A bad benchmark argument or a failed equality check; the message says which."""


def pin_cores(threads: int) -> list[int]:
    """Restrict this process to the first `threads` allowed cores; returns them.

    Both frameworks size their pools from the affinity mask at start-up, so JAX (XLA:CPU's
    Eigen pool) and torch run on the same cores with the same count.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise BenchmarkError(f"--threads {threads}: only {len(allowed)} cores are available")
    cores = allowed[:threads]
    os.sched_setaffinity(0, cores)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    return cores


def add_model_flags(parser) -> None:
    """The flags shared by both benchmarks (config, sizes, precision, attention, remat)."""
    parser.add_argument("--config", default="configs/ade20k_segmenter.py", help="path[:arg]")
    parser.add_argument("--variant", default=None, help="Ti/16, S/16, B/16, L/16")
    parser.add_argument("--head", default=None, choices=("rankseg", "mask", "gt"))
    parser.add_argument("--resolution", type=int, default=None, help="square crop size")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--attention", default=None, choices=("auto", "xla", "cudnn"))
    parser.add_argument("--remat", default=None, choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--dropout", type=float, default=None, help="decoder dropout override")
    parser.add_argument("--threads", type=int, default=None, help="pin to this many cores")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU; GPU known")
    parser.add_argument("--compare-torch", action="store_true")


def apply_cpu_target(args) -> None:
    """`--compare-torch` alone means the CPU target; explicit flags still win."""
    if not args.compare_torch:
        return
    for key, value in CPU_TARGET.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dropout is None:
        args.dropout = 0.0  # deterministic steps, so the outputs can be asserted equal


def load_config(args):
    """The config of --config with the flag overrides applied (configs are not edited)."""
    from rankseg_jax import recipes
    from rankseg_jax.models import registry, segmenter

    path, _, arg = args.config.partition(":")
    module = _import_path(ROOT / path if not os.path.isabs(path) else pathlib.Path(path))
    config = module.get_config(arg)
    m = config.model
    with config.unlocked():
        if args.variant:
            m.variant = args.variant
            m.width = m.depth = m.num_heads = m.mlp_dim = 0
            m.dec_width = m.dec_heads = m.dec_mlp_dim = 0
        if args.head:
            m.classifier = recipes.classifier(args.head)
            m.dec_layers = 3 if args.head == "rankseg" else 2
            m.k = min(m.k, m.n_cls) if args.head == "rankseg" else m.n_cls
        if args.resolution:
            m.img_size = (args.resolution, args.resolution)
            config.data.crop_size = (args.resolution, args.resolution)
            config.eval.crop = (args.resolution, args.resolution)
        if args.batch:
            config.batch_size = args.batch
        if args.dtype:
            m.compute_dtype = args.dtype
        if args.attention:
            m.attention_impl = args.attention
        if args.remat:
            m.remat = args.remat
        if args.dropout is not None:
            m.dropout = args.dropout
            m.drop_path_rate = 0.0 if args.dropout == 0.0 else m.drop_path_rate
    if not registry.is_multi_level(m):  # conv families (DeepLabV3): no ViT sizes to resolve
        segmenter.vit_dims(m)
    return config


def _import_path(path: pathlib.Path):
    import importlib.util

    if not path.exists():
        raise BenchmarkError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> dict:
    """Per-call wall times of `fn` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return dict(
        median_s=statistics.median(times),
        mean_s=statistics.fmean(times),
        min_s=min(times),
        steps=steps,
        warmup=warmup,
    )


def versions() -> dict:
    import jax

    out = dict(jax=jax.__version__, python=platform.python_version())
    try:
        import flax

        out["flax"] = flax.__version__
    except ImportError:
        pass
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].__version__
    return out


def device_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return dict(backend=jax.default_backend(), device=dev.device_kind, n_devices=jax.device_count())


def peak_flops(args) -> float | None:
    """Dense peak FLOP/s for MFU: --peak-tflops, else the bf16 spec of known GPUs, else None."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    import jax

    kind = jax.devices()[0].device_kind
    if "H100" in kind or "H200" in kind:
        return 989e12
    return None


def device_peak_memory() -> dict:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    return dict(peak_device_memory_gb=None if peak is None else peak / 2**30, host_peak_rss_gb=rss)


def cost_analysis_flops(compiled) -> float | None:
    """XLA's own FLOP count of a compiled executable (None where the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning nothing
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return None if flops is None or flops < 0 else float(flops)


def emit(record: dict) -> None:
    """One JSON line per measurement on stdout."""
    print(json.dumps(record, sort_keys=False), flush=True)
