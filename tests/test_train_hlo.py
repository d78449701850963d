"""The compiled RankSeg training step never materialises n_cls full-resolution logits.

RankSeg trains on k ≪ n_cls slot logits (performance.md 3d/4.9): the upsample before the loss
is (B, H, W, k), not (B, H, W, n_cls). A scatter into the n_cls canvas (inference only), or a
(B, H·W, n_cls) one-hot in the class histogram, would bring n_cls·H·W arrays back; this test
scans the shapes of every array in the optimised HLO. The baseline (mask head) step, which
does upsample n_cls channels, is the positive control that shows the scan finds such arrays.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import pytest

from configs import ade20k_segmenter
from rankseg_jax import optim, train
from rankseg_jax import sharding as shd
from rankseg_jax.models.segmenter import create_model

CROP = 64
N_CLS = 150
SHAPE = re.compile(r"\b(?:pred|s8|s16|s32|s64|u8|u16|u32|u64|bf16|f16|f32|f64)\[([\d,]*)\]")


def tiny_config(head: str):
    config = ade20k_segmenter.get_config(f"head={head},runlocal")
    with config.unlocked():
        config.model.update(img_size=(CROP, CROP), n_cls=N_CLS, k=8 if head == "rankseg" else N_CLS)
        config.data.crop_size = (CROP, CROP)
        config.batch_size = 2
    return config


def optimised_hlo(config) -> str:
    model, tx = create_model(config.model), optim.make_optimizer(config)
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    images = jnp.zeros((1, CROP, CROP, 3), jnp.float32)
    labels = jnp.zeros((1, CROP, CROP), jnp.int32)
    abstract = jax.eval_shape(
        lambda: train.new_state(
            model.init(jax.random.PRNGKey(0), images, gt_labels=labels)["params"], tx, 0
        )
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, abstract)
    step = train.compile_train_step(model, tx, config, shardings, shd.batch_sharding(mesh))
    b = config.batch_size
    batch = dict(
        image=jax.ShapeDtypeStruct((b, CROP, CROP, 3), jnp.float32),
        label=jax.ShapeDtypeStruct((b, CROP, CROP), jnp.int32),
    )
    return step.lower(abstract, batch).compile().as_text()


def largest_arrays(hlo: str, threshold: int) -> list[str]:
    """Every array shape in the HLO text with at least `threshold` elements."""
    found = set()
    for match in SHAPE.finditer(hlo):
        dims = [int(d) for d in match.group(1).split(",") if d]
        if dims and math.prod(dims) >= threshold:
            found.add(match.group(0))
    return sorted(found)


@pytest.fixture(scope="module")
def threshold() -> int:
    return N_CLS * CROP * CROP  # one image's n_cls full-resolution logits


def test_rankseg_step_has_no_n_cls_full_resolution_array(threshold):
    hlo = optimised_hlo(tiny_config("rankseg"))
    assert "ENTRY" in hlo
    assert largest_arrays(hlo, threshold) == []
    # The k-slot logits at full resolution are there: the scan does see upsampled arrays.
    assert largest_arrays(hlo, 8 * CROP * CROP)


def test_scan_finds_them_in_the_baseline_step(threshold):
    """Positive control: the mask head's loss upsamples all n_cls channels."""
    assert largest_arrays(optimised_hlo(tiny_config("mask")), threshold)
