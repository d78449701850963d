"""`--mode=train`: train (resuming from the workdir), evaluating every `eval.every_steps`."""

from __future__ import annotations

import ml_collections

from rankseg_jax import train


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Train; prints the final mIoU when the run evaluated. Returns 0."""
    results = train.train_and_evaluate(config, workdir)
    if results:
        print(f"final mIoU {100 * results['mIoU']:.2f} (aAcc {100 * results['aAcc']:.2f})")
    return 0
