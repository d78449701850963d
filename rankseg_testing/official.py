"""The configs of the official fixture models (`../shared/fixtures/official/*_small.pth`).

The fixtures were made with the real ADE20K configs shrunk to a 64-wide, 2-layer ViT at 64×64
(see the fixtures' README); these helpers build the matching config and load their weights.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rankseg_jax.config import load_config
from rankseg_jax.convert import loading, mmseg
from rankseg_jax.models.segmenter import create_model


def small_config(head: str = "rankseg") -> ml_collections.ConfigDict:
    """The ADE20K config with the fixtures' "small" overrides (width 64, depth 2, 64×64)."""
    config = load_config(f"configs/ade20k_segmenter.py:head={head}")
    with config.unlocked():
        config.model.update(
            variant="custom", width=64, depth=2, num_heads=2, mlp_dim=256,
            dec_heads=2, img_size=(64, 64), k=50 if head == "rankseg" else 150,
        )  # fmt: skip
        config.eval.update(crop=(64, 64), stride=(64, 64))
    return config


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The `state_dict` of an mmcv checkpoint as float32 numpy arrays (no torch needed)."""
    return loading.read_state_dict(path)


def load_small(path: str | pathlib.Path, head: str = "rankseg"):
    """(model, params) for one of the official small checkpoints."""
    config = small_config(head)
    model = create_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    params = mmseg.state_dict_to_params(
        read_state_dict(path), shapes["params"], gt_head=head == "gt", source=str(path)
    )
    return model, params
