"""What each `main.py --mode` does; every function takes (config, workdir) and returns a code."""

from __future__ import annotations

import sys

import ml_collections

from rankseg_jax.convert import export


def predict(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Label maps, overlays, class rankings and figures (rankseg_jax.predict; exit code there)."""
    from rankseg_jax import predict as predict_lib

    return predict_lib.run(config, workdir)


def train(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Train (resuming from the workdir); dataset and checkpoint problems are one line."""
    from rankseg_jax import train as train_lib

    results = train_lib.train_and_evaluate(config, workdir)
    if results:
        print(f"final mIoU {100 * results['mIoU']:.2f} (aAcc {100 * results['aAcc']:.2f})")
    return 0


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Evaluate the workdir's checkpoint (else init_from) on the val split; see eval_mode."""
    from rankseg_jax import eval_mode

    return eval_mode.eval_command(config, workdir)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> int:
    """Run one mode; user errors (data, weights, config) print one line and exit 2."""
    from rankseg_jax.errors import USER_ERRORS

    commands = {"train": train, "eval": evaluate, "predict": predict, "export": export.export}
    try:
        return commands[mode](config, workdir)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
