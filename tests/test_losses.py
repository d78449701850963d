"""rankseg_jax.losses against the official PyTorch outputs and the torch reference functions.

Official fixtures: the small RankSeg and baseline checkpoints on x64/y64 in deterministic mode;
every logged key (mean and per image) within 1e-5 relative + 1e-6 absolute, and the gradient of
the mean total loss w.r.t. every parameter within 2e-5 of each tensor's largest |value|
(measured: 4e-6). Torch reference: random logits and labels at other sizes (odd upsampling,
ignore pixels, absent classes, an image with no valid pixel); values within 1e-5 relative and
gradients within 1e-5 of each tensor's largest |value| (float32 on both sides).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax import losses
from rankseg_jax.config import with_defaults
from rankseg_jax.convert import mmseg
from rankseg_jax.errors import ConfigError
from rankseg_jax.models.heads import gt_class_slots

FIXTURE_NAMES = {"rankseg": "rankseg", "mask": "baseline"}
LOSS_CONFIG = with_defaults().loss  # ADE RankSeg: ASL(2, 0) × 10


def assert_close_to_max(actual, expected, tol, what=""):
    """max |actual − expected| ≤ tol · max |expected| (+1e-9), per tensor."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    scale = max(float(np.abs(expected).max()), 1e-9)
    err = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# --------------------------------------------------------------------------------------------
# Official fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_terms(official, official_small):
    """{head: (LossTerms, grads as an mmseg state dict)} on x64/y64, deterministic."""
    from rankseg_testing.official import small_config

    images = jnp.asarray(np.load(official / "x64.npy").transpose(0, 2, 3, 1))
    labels = jnp.asarray(np.load(official / "y64.npy").astype(np.int32))
    result = {}
    for head, (model, params) in official_small.items():
        loss_config = small_config(head).loss

        def total(p, model=model, loss_config=loss_config):
            outputs = model.apply({"params": p}, images, train=False)
            terms = losses.loss_terms(outputs, labels, loss_config, 150, 255)
            return terms.total, terms

        (_, terms), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
        result[head] = (terms, mmseg.params_to_state_dict(jax.tree.map(np.asarray, grads)))
    return result


@pytest.mark.parametrize("head", ["rankseg", "mask"])
def test_logged_values_match_official(official, official_terms, head):
    reference = json.loads((official / f"{FIXTURE_NAMES[head]}_loss.json").read_text())
    terms, _ = official_terms[head]
    assert set(terms.metrics) == set(reference["mean"])
    for key, value in reference["mean"].items():
        np.testing.assert_allclose(
            float(terms.metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=key
        )
    np.testing.assert_allclose(float(terms.total), reference["mean"]["loss"], rtol=1e-5)
    for i, image_terms in enumerate(reference["per_image_terms"] or []):
        assert set(terms.per_image) == set(image_terms)
        for key, value in image_terms.items():
            got = float(terms.per_image[key][i])
            np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=f"{key}[{i}]")


@pytest.mark.parametrize("head", ["rankseg", "mask"])
def test_gradients_match_official(official, official_terms, head):
    reference = np.load(official / f"{FIXTURE_NAMES[head]}_grads.npz")
    _, grads = official_terms[head]
    assert set(grads) == set(reference.files)
    for name in reference.files:
        assert np.all(np.isfinite(grads[name])), name
        assert_close_to_max(grads[name], reference[name], 2e-5, name)


# --------------------------------------------------------------------------------------------
# Against the torch reference's functions
# --------------------------------------------------------------------------------------------

tr = pytest.importorskip("rankseg_testing.torch_reference")


def to_torch(x, requires_grad=False):
    import torch

    return torch.tensor(np.asarray(x), requires_grad=requires_grad)


def nchw(x):
    """(B, h, w, C) numpy → (B, C, h, w) torch, a leaf that records its gradient."""
    return to_torch(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)), True)


def random_labels(rng, shape, n_cls, present, ignore_frac=0.2):
    """Labels drawn from `present` classes per image, with some 255 pixels."""
    labels = np.empty(shape, np.int64)
    for b in range(shape[0]):
        labels[b] = rng.choice(present[b], size=shape[1:])
    labels[rng.random(shape) < ignore_frac] = 255
    return labels


def test_multi_hot_matches_histc():
    rng = np.random.default_rng(0)
    n_cls = 12
    labels = rng.integers(0, n_cls, (3, 9, 7))
    labels[0, :3] = 255
    labels[1, 0, :4] = [-1, n_cls, n_cls + 5, 300]  # outside [0, n_cls): not counted
    labels[2] = 255  # nothing valid
    labels[1][labels[1] == 4] = 5  # an absent class
    expected = tr.multi_hot_target(to_torch(labels), n_cls).numpy()
    got = losses.multi_hot(jnp.asarray(labels, jnp.int32), n_cls)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), expected)
    hist = tr.class_histogram(to_torch(labels), n_cls).numpy()
    np.testing.assert_array_equal(
        np.asarray(losses.class_histogram(jnp.asarray(labels), n_cls)), hist
    )


@pytest.mark.parametrize("gammas", [(2.0, 0.0), (4.0, 1.0), (0.0, 0.0)])
def test_asymmetric_loss_and_gradient_match_torch(gammas):
    gamma_neg, gamma_pos = gammas
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (4, 30)).astype(np.float32)
    logits[0, :6] = [40.0, -40.0, 18.0, -18.0, 0.0, np.log(0.05 / 0.95)]  # saturated, clip edge
    targets = (rng.random((4, 30)) < 0.3).astype(np.float32)
    targets[0, :6] = [1, 1, 1, 0, 0, 0]
    x = to_torch(logits, True)
    expected = tr.asymmetric_loss(x, to_torch(targets), gamma_neg, gamma_pos)
    expected.backward()

    def loss(z):
        return losses.asymmetric_loss(z, jnp.asarray(targets), gamma_neg, gamma_pos)

    value, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert_close_to_max(grad, x.grad.numpy(), 1e-5, "ASL gradient")


def test_asl_gradient_flows_through_focusing_weight():
    """A negative at p = 0.5 with gamma_neg 2: the weight's own derivative changes the result."""
    logits, targets = jnp.zeros((1, 1)), jnp.zeros((1, 1))
    grad = jax.grad(losses.asymmetric_loss)(logits, targets)
    # ℓ = −log(1 − p + clip)·(p − clip)²; dℓ/dx at p = 1/2 with dp/dx = 1/4:
    p, c = 0.5, 0.05
    expected = 0.25 * ((p - c) ** 2 / (1 - p + c) - 2 * (p - c) * np.log(1 - p + c))
    np.testing.assert_allclose(float(grad[0, 0]), expected, rtol=1e-5)


def test_bce_matches_torch():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 4, (3, 17)).astype(np.float32)
    logits[0, :2] = [60.0, -60.0]
    targets = (rng.random((3, 17)) < 0.4).astype(np.float32)
    x = to_torch(logits, True)
    expected = tr.bce_loss(x, to_torch(targets))
    expected.backward()
    value, grad = jax.value_and_grad(losses.bce_loss)(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-6)
    assert_close_to_max(grad, x.grad.numpy(), 1e-6, "BCE gradient")


def test_relabel_to_slots_matches_torch():
    rng = np.random.default_rng(3)
    n_cls, k = 20, 6
    topk = np.stack([rng.permutation(n_cls)[:k] for _ in range(3)])
    labels = random_labels(rng, (3, 11, 13), n_cls, [np.arange(n_cls)] * 3)
    expected = tr.relabel_to_slots(to_torch(labels), to_torch(topk)).numpy()
    got = losses.relabel_to_slots(jnp.asarray(labels), jnp.asarray(topk, jnp.int32), 255)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert set(np.unique(expected)) - {255} <= set(range(k))


def test_relabel_ignores_empty_slots_and_other_ignore_values():
    labels = jnp.asarray([[[0, 3, 5, 65535]]])
    topk = jnp.asarray([[5, 0, -1, -1]])
    got = losses.relabel_to_slots(labels, topk, 65535)
    np.testing.assert_array_equal(np.asarray(got), [[[1, 65535, 0, 65535]]])


def test_pixel_ce_and_accuracy_match_torch_after_upsampling(torch):
    rng = np.random.default_rng(4)
    masks = rng.normal(0, 2, (2, 5, 7, 9)).astype(np.float32)
    labels = random_labels(rng, (2, 37, 45), 9, [np.arange(9)] * 2)
    x = nchw(masks)
    logits_t = tr.resize_bilinear(x, labels.shape[1:])
    expected = tr.cross_entropy_all_pixels(logits_t, to_torch(labels))
    expected.backward()
    accuracy = tr.pixel_accuracy(logits_t.detach(), to_torch(labels)).item()

    def loss(m):
        return losses.pixel_ce_all_pixels(losses.upsample_logits(m, labels.shape[1:]), labels, 255)

    value, grad = jax.value_and_grad(loss)(jnp.asarray(masks))
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    assert_close_to_max(grad, x.grad.numpy().transpose(0, 2, 3, 1), 1e-5, "CE gradient")
    up = losses.upsample_logits(jnp.asarray(masks), labels.shape[1:])
    np.testing.assert_allclose(float(losses.pixel_accuracy(up, labels)), accuracy, rtol=1e-6)
    # All pixels are in the denominator: torch's default (valid-pixel) mean × valid fraction.
    valid_mean = torch.nn.functional.cross_entropy(
        logits_t.detach(), to_torch(labels), ignore_index=255
    )
    np.testing.assert_allclose(float(value), valid_mean.item() * (labels != 255).mean(), rtol=1e-5)


def rankseg_case(seed=5, batch=3, n_cls=20, k=7, size=(23, 19), feat=(6, 5), empty_image=1):
    """Random slot logits, image logits, top-k and labels: each image has classes in and out of
    its top-k, absent classes, ignore pixels; image `empty_image` has no valid pixel."""
    rng = np.random.default_rng(seed)
    img_logits = rng.normal(0, 2, (batch, n_cls)).astype(np.float32)
    topk = np.argsort(-img_logits, axis=1)[:, :k]
    present = [
        np.concatenate([topk[b, :3], np.argsort(-img_logits[b])[k : k + 2]]) for b in range(batch)
    ]
    labels = random_labels(rng, (batch, *size), n_cls, present)
    if empty_image is not None:
        labels[empty_image] = 255
    masks = rng.normal(0, 2, (batch, *feat, k)).astype(np.float32)
    return masks, topk, img_logits, labels


@pytest.mark.parametrize("img_loss", ["asl", "bce"])
@pytest.mark.parametrize("empty_image", [None, 1])
def test_rankseg_losses_match_torch_head(img_loss, empty_image):
    n_cls, k = 20, 7
    masks, topk, img_logits, labels = rankseg_case(n_cls=n_cls, k=k, empty_image=empty_image)
    head = tr.MaskTransformerRankSegHead(
        n_cls=n_cls, d_encoder=8, n_heads=1, d_model=8, d_ff=16, topk_cls=k, img_loss=img_loss,
        gamma_neg=2.0, gamma_pos=0.0, img_loss_weight=5.0,
    )  # fmt: skip
    x_masks, x_img = nchw(masks), to_torch(img_logits, True)
    outputs_t = tr.RankSegOutput(x_img, to_torch(topk), x_masks)
    expected = head.losses(outputs_t, to_torch(labels))
    (expected["loss_img"] + expected["loss_seg"]).backward()

    config = with_defaults(dict(loss=dict(img_loss=img_loss, img_loss_weight=5.0))).loss

    def total(m, z):
        outputs = dict(masks=m, topk=jnp.asarray(topk, jnp.int32), img_logits=z)
        terms = losses.loss_terms(outputs, jnp.asarray(labels), config, n_cls, 255)
        return terms.total, terms

    (value, terms), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.asarray(masks), jnp.asarray(img_logits)
    )
    for key, ref in expected.items():
        got = float(terms.metrics[f"decode.{key}"])
        np.testing.assert_allclose(got, ref.item(), rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(
        float(value), (expected["loss_img"] + expected["loss_seg"]).item(), rtol=1e-5
    )
    assert_close_to_max(grads[0], x_masks.grad.numpy().transpose(0, 2, 3, 1), 1e-5, "d/d masks")
    assert_close_to_max(grads[1], x_img.grad.numpy(), 1e-5, "d/d img_logits")


def test_per_image_terms_equal_single_image_runs():
    n_cls, k = 20, 7
    masks, topk, img_logits, labels = rankseg_case(n_cls=n_cls, k=k, empty_image=1)

    def terms(sl):
        outputs = dict(
            masks=jnp.asarray(masks[sl]),
            topk=jnp.asarray(topk[sl]),
            img_logits=jnp.asarray(img_logits[sl]),
        )
        return losses.loss_terms(outputs, jnp.asarray(labels[sl]), LOSS_CONFIG, n_cls, 255)

    batch = terms(slice(None))
    for b in range(masks.shape[0]):
        alone = terms(slice(b, b + 1))
        for key, value in alone.metrics.items():
            np.testing.assert_allclose(
                float(batch.per_image[key][b]), float(value), rtol=1e-6, err_msg=key
            )
    # The empty image counts 1 alone but is dropped from the batch mean of the recalls.
    assert float(batch.per_image["decode.acc_pix"][1]) == 1.0
    others = np.asarray(batch.per_image["decode.acc_pix"])[[0, 2]]
    np.testing.assert_allclose(float(batch.metrics["decode.acc_pix"]), others.mean(), rtol=1e-6)


def test_batch_without_valid_pixels_logs_recall_one():
    masks, topk, img_logits, labels = rankseg_case(batch=2)
    labels[:] = 255
    outputs = dict(
        masks=jnp.asarray(masks), topk=jnp.asarray(topk), img_logits=jnp.asarray(img_logits)
    )
    terms = losses.loss_terms(outputs, jnp.asarray(labels), LOSS_CONFIG, 20, 255)
    assert float(terms.metrics["decode.acc_pix"]) == 1.0
    assert float(terms.metrics["decode.acc_img"]) == 1.0
    assert float(terms.metrics["decode.loss_seg"]) == 0.0
    assert float(terms.metrics["decode.acc_img_accuracy"]) == 0.0


def test_baseline_losses_match_torch_head():
    rng = np.random.default_rng(6)
    n_cls = 9
    masks = rng.normal(0, 2, (2, 4, 6, n_cls)).astype(np.float32)
    labels = random_labels(rng, (2, 31, 29), n_cls, [np.arange(4), np.arange(3, 9)])
    head = tr.MaskTransformerHead(n_cls=n_cls, d_encoder=8, n_heads=1, d_model=8, d_ff=16)
    x = nchw(masks)
    expected = head.losses(x, to_torch(labels))
    expected["loss_seg"].backward()

    def total(m):
        outputs = dict(masks=m, topk=None, img_logits=None)
        return losses.segmentation_losses(outputs, jnp.asarray(labels), LOSS_CONFIG, n_cls, 255)

    (value, metrics), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(masks))
    assert set(metrics) == {"decode.loss_seg", "decode.acc_seg", "loss"}
    np.testing.assert_allclose(float(value), expected["loss_seg"].item(), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["decode.acc_seg"]), expected["acc_seg"].item(), rtol=1e-6
    )
    assert_close_to_max(grad, x.grad.numpy().transpose(0, 2, 3, 1), 1e-5, "d/d masks")


def test_gt_head_losses_match_torch_head():
    """Slots = the GT classes ascending, −1 / −100 in padded slots; no image loss."""
    rng = np.random.default_rng(7)
    n_cls, batch, feat = 10, 3, (5, 4)
    labels = random_labels(rng, (batch, 21, 17), n_cls, [[1, 4, 7], [0, 9], [2]])
    labels[2] = 255  # no class at all: the head then uses class 0
    ids, valid = gt_class_slots(jnp.asarray(labels), n_cls, n_cls)
    ids, valid = np.asarray(ids), np.asarray(valid)
    raw = rng.normal(0, 2, (batch, *feat, n_cls)).astype(np.float32)
    head = tr.MaskTransformerRankSegGTHead(n_cls=n_cls, d_encoder=8, n_heads=1, d_model=8, d_ff=16)
    leaves, outputs_t = [], []
    for b in range(batch):
        k_b = int(valid[b].sum())
        leaf = nchw(raw[b : b + 1, ..., :k_b])
        leaves.append(leaf)
        outputs_t.append(tr.GTOutput(to_torch(ids[b : b + 1, :k_b]), leaf))
    expected = head.losses(outputs_t, to_torch(labels))
    expected["loss_seg"].backward()

    def total(m):
        m = jnp.where(jnp.asarray(valid)[:, None, None, :], m, -100.0)
        outputs = dict(masks=m, topk=jnp.asarray(ids), img_logits=None)
        return losses.segmentation_losses(outputs, jnp.asarray(labels), LOSS_CONFIG, n_cls, 255)

    (value, metrics), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(raw))
    assert "decode.loss_img" not in metrics
    for key, ref in expected.items():
        np.testing.assert_allclose(
            float(metrics[f"decode.{key}"]), ref.item(), rtol=1e-5, atol=1e-6, err_msg=key
        )
    np.testing.assert_allclose(float(value), expected["loss_seg"].item(), rtol=1e-5)
    grad = np.asarray(grad)
    for b, leaf in enumerate(leaves):
        k_b = leaf.shape[1]
        assert_close_to_max(
            grad[b, ..., :k_b], leaf.grad[0].permute(1, 2, 0).numpy(), 1e-5, f"image {b}"
        )
        assert np.all(grad[b, ..., k_b:] == 0)


def test_losses_jit_and_compute_in_float32():
    masks, topk, img_logits, labels = rankseg_case(batch=2, empty_image=None)
    outputs = dict(
        masks=jnp.asarray(masks, jnp.bfloat16),
        topk=jnp.asarray(topk),
        img_logits=jnp.asarray(img_logits, jnp.bfloat16),
    )
    fn = jax.jit(lambda o, y: losses.segmentation_losses(o, y, LOSS_CONFIG, 20, 255))
    total, metrics = fn(outputs, jnp.asarray(labels))
    assert total.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    expected = {
        **outputs,
        "masks": outputs["masks"].astype(jnp.float32),
        "img_logits": outputs["img_logits"].astype(jnp.float32),
    }
    np.testing.assert_allclose(float(total), float(fn(expected, jnp.asarray(labels))[0]), rtol=1e-6)


def test_bad_inputs_give_clear_errors():
    masks, topk, img_logits, labels = rankseg_case(batch=2)
    outputs = dict(
        masks=jnp.asarray(masks), topk=jnp.asarray(topk), img_logits=jnp.asarray(img_logits)
    )
    bad = with_defaults(dict(loss=dict(img_loss="focal"))).loss
    with pytest.raises(ConfigError, match="loss.img_loss='focal'"):
        losses.segmentation_losses(outputs, jnp.asarray(labels), bad, 20, 255)
    with pytest.raises(ValueError, match="labels"):
        losses.segmentation_losses(outputs, jnp.asarray(labels[0]), LOSS_CONFIG, 20, 255)
    with pytest.raises(ValueError, match="img_logits"):
        losses.segmentation_losses(outputs, jnp.asarray(labels), LOSS_CONFIG, 21, 255)
