"""Model parity against the official fixtures, parameter counts, and batch semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ade20k_full, ade20k_segmenter, coco_stuff10k, pascal_context
from rankseg_jax.models.heads import adaptive_avg_pool
from rankseg_jax.models.segmenter import create_model, scatter_to_classes
from rankseg_jax.models.vit import resize_pos_embed

FIXTURE_TOL = 1e-5  # absolute, float32 against the official PyTorch outputs
FIXTURE_NAME = {"rankseg": "rankseg", "mask": "baseline"}


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 2, 3, 1))


def run_fixture(model, params, image):
    """Forward with intermediates, the canvas at feature size, and encode_decode."""
    variables = {"params": params}
    out, state = model.apply(variables, image, mutable=["intermediates"])
    inter = state["intermediates"]["backbone"]
    canvas = scatter_to_classes(out["masks"], out["topk"], model.n_cls)
    logits = model.apply(variables, image, method=model.encode_decode)
    return out, inter, canvas, logits


@pytest.mark.parametrize("head", ["rankseg", "mask"])
@pytest.mark.parametrize("name", ["x64", "x80", "x64x100"])
def test_matches_official_fixtures(official, official_small, head, name):
    model, params = official_small[head]
    image = jnp.asarray(nhwc(np.load(official / f"{name}.npy")))
    ref = dict(np.load(official / f"{FIXTURE_NAME[head]}_fwd_{name}.npz"))
    out, inter, canvas, logits = run_fixture(model, params, image)
    b, h, w = canvas.shape[:3]
    feat = inter["out_1"][0][:, 1:].reshape(b, h, w, -1)  # before the final norm
    np.testing.assert_allclose(
        inter["out_0"][0][:, 1:].reshape(b, h, w, -1), nhwc(ref["backbone_out_0"]), atol=FIXTURE_TOL
    )
    assert not np.allclose(feat, nhwc(ref["feat"]), atol=1e-3)  # the final LN must matter
    feats = model.apply({"params": params}, image, method=lambda m, x: m.backbone(x))
    np.testing.assert_allclose(feats, nhwc(ref["backbone_out_1"]), atol=FIXTURE_TOL)
    np.testing.assert_allclose(feats, nhwc(ref["feat"]), atol=FIXTURE_TOL)
    np.testing.assert_allclose(canvas, nhwc(ref["seg_logits_feat"]), atol=FIXTURE_TOL)
    np.testing.assert_allclose(logits, nhwc(ref["seg_logits"]), atol=FIXTURE_TOL)
    if head == "rankseg":
        np.testing.assert_array_equal(out["topk"], ref["topk_index"])
        np.testing.assert_allclose(out["img_logits"], ref["img_pred"], atol=FIXTURE_TOL)
        np.testing.assert_allclose(out["masks"], nhwc(ref["masks_topk"]), atol=FIXTURE_TOL)
        fill = nhwc(ref["seg_logits_feat"]) == -100.0
        assert fill.sum() == b * h * w * (150 - 50)
        np.testing.assert_array_equal(np.asarray(canvas)[fill], -100.0)


PARAM_COUNTS = [
    (ade20k_segmenter, "", 109_702_138),
    (ade20k_segmenter, "head=mask", 102_497_580),
    (ade20k_segmenter, "variant=L/16", 345_986_298),
    (ade20k_segmenter, "variant=L/16,head=mask", 333_234_476),
    (pascal_context, "", 109_563_758),
    (coco_stuff10k, "", 109_734_415),
]


def count_params(config) -> dict[str, int]:
    model = create_model(config.model)
    image = jnp.zeros((1, *config.model.img_size, 3))
    labels = jnp.zeros((1, *config.model.img_size), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, gt_labels=labels)
    return {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in shapes["params"].items()}


@pytest.mark.parametrize("module,arg,expected", PARAM_COUNTS)
def test_parameter_counts(module, arg, expected):
    counts = count_params(module.get_config(arg))
    assert sum(counts.values()) == expected
    if "L/16" in arg:
        assert counts["backbone"] == 304_739_328


def test_parameter_counts_other_configs():
    """OCE moves cls_emb into the backbone (same total); ADE20K-Full builds at 847 classes."""
    oce = count_params(ade20k_segmenter.get_config("oce"))
    assert sum(oce.values()) == 109_702_138
    assert oce["backbone"] == 86_434_560 + 150 * 768
    assert sum(count_params(ade20k_full.get_config("")).values()) > 109_702_138


@pytest.mark.parametrize(
    "src,dst", [((24, 24), (32, 32)), ((24, 24), (40, 40)), ((32, 32), (30, 30)),
                ((32, 32), (16, 32)), ((4, 4), (4, 7))],
)  # fmt: skip
def test_pos_embed_resize_matches_torch(torch, src, dst):
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(1, 1 + src[0] * src[1], 32)).astype(np.float32)
    got = np.asarray(resize_pos_embed(jnp.asarray(pos), src, dst))
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, *src, 32).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 32).numpy()
    np.testing.assert_array_equal(got[:, 0], pos[:, 0])
    np.testing.assert_allclose(got[:, 1:], ref, atol=1e-5)


def test_pos_embed_kept_when_token_count_matches():
    """mmseg adds the stored embedding as is when the token count matches (6×6 vs 4×9)."""
    pos = jnp.arange(37 * 2, dtype=jnp.float32).reshape(1, 37, 2)
    np.testing.assert_array_equal(resize_pos_embed(pos, (6, 6), (4, 9)), pos)


@pytest.mark.parametrize("n", [4, 5, 30, 32, 40])
def test_adaptive_pool_matches_torch(torch, n):
    x = np.random.default_rng(n).normal(size=(2, n, n + 1, 8)).astype(np.float32)
    got = adaptive_avg_pool(jnp.asarray(x), 8)
    nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ref = torch.nn.functional.adaptive_avg_pool2d(nchw, 8)
    np.testing.assert_allclose(got, nhwc(ref.numpy()), atol=1e-6)


def test_batch_equals_single_images(official_small):
    """A batch of 4 gives what 4 single-image runs give, with different top-k sets."""
    model, params = official_small["rankseg"]
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(-1, 1, (4, 64, 80, 3)).astype(np.float32))
    batch = model.apply({"params": params}, images)
    sets = {frozenset(np.asarray(t).tolist()) for t in batch["topk"]}
    assert len(sets) > 1, "the test needs images whose top-k sets differ"
    for i in range(4):
        single = model.apply({"params": params}, images[i : i + 1])
        np.testing.assert_array_equal(single["topk"][0], batch["topk"][i])
        np.testing.assert_allclose(single["masks"][0], batch["masks"][i], atol=1e-5)
        np.testing.assert_allclose(single["img_logits"][0], batch["img_logits"][i], atol=1e-5)
