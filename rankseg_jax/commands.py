"""What each `main.py --mode` does; every function takes (config, workdir) and returns a code."""

from __future__ import annotations

import ml_collections


def predict(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Label maps, overlays, class rankings and figures (rankseg_jax.predict; exit code there)."""
    from rankseg_jax import predict as predict_lib

    return predict_lib.run(config, workdir)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str) -> int:
    return {"predict": predict}[mode](config, workdir)
