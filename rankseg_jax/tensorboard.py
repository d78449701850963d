"""TensorFlow (pulled in by clu's metric writers) must never take the GPU from JAX."""

from __future__ import annotations

import os


def hide_gpus_from_tensorflow() -> None:
    """Make TensorFlow CPU-only before anything imports it (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices: nothing left to hide
        pass
