"""float32 matmuls of the ViT-S/16-at-256 training shapes: XLA (jitted) against torch, one line
each.

The CPU comparison in benchmarks/README.md found the gap between the JAX and PyTorch steps in
the matmuls; this isolates them. Set XLA_FLAGS before running to try XLA:CPU's switches.

    python benchmarks/matmul.py              # 2 pinned threads, median of 30 calls
"""

from __future__ import annotations

import argparse
import functools

from common import emit, pin_cores, time_calls  # type: ignore[import-not-found]

# (M, K, N) of qkv, mlp fc1, mlp fc2 and the attention output projection at B = 2, N = 257.
SHAPES = ((514, 384, 1152), (514, 384, 1536), (514, 1536, 384), (514, 384, 384))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    pin_cores(args.threads)
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    matmul = jax.jit(lambda a, b: a @ b)
    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
        xla_call = functools.partial(lambda x, y: matmul(x, y).block_until_ready(), ja, jb)
        torch_call = functools.partial(torch.matmul, torch.tensor(a), torch.tensor(b))
        xla = 1e3 * time_calls(xla_call, args.calls, warmup=2)["median_s"]
        ref = 1e3 * time_calls(torch_call, args.calls, warmup=2)["median_s"]
        gflop = 2 * m * k * n / 1e9
        emit(
            dict(
                benchmark="matmul", shape=[m, k, n], threads=args.threads, xla_ms=xla,
                torch_ms=ref, xla_gflops=gflop / xla * 1e3, torch_gflops=gflop / ref * 1e3,
                ratio=ref / xla,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
