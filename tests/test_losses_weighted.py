"""Class-weighted CE (plain and RankSeg rank-slot) against torch, and mmseg's DiceLoss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax import losses

IGNORE = 255
# Jitted once: eager op-by-op dispatch of these losses is slower than one compile.
slot_ce = jax.jit(losses.weighted_slot_ce, static_argnames=("ignore_index", "reduction"))


def _case(seed: int, b: int = 2, h: int = 6, w: int = 7, c: int = 5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, h, w, c)).astype(np.float32) * 2
    labels = rng.integers(0, c, (b, h, w)).astype(np.int32)
    labels[rng.random((b, h, w)) < 0.2] = IGNORE
    weight = rng.uniform(0.2, 3.0, c).astype(np.float32)
    return logits, labels, weight


@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_ce_equals_torch(torch, seed):
    logits, labels, weight = _case(seed)
    ours, grad = jax.value_and_grad(
        lambda x: losses.weighted_pixel_ce(x, jnp.asarray(labels), jnp.asarray(weight))
    )(jnp.asarray(logits))
    x = torch.tensor(logits).permute(0, 3, 1, 2).requires_grad_()
    ref = torch.nn.functional.cross_entropy(
        x, torch.tensor(labels).long(), weight=torch.tensor(weight), ignore_index=IGNORE
    )
    ref.backward()
    assert float(ours) == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(
        np.asarray(grad), x.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-7
    )
    # mmseg 0.x's reduction: the same weighted sum over ALL pixels.
    none = torch.nn.functional.cross_entropy(
        x.detach(), torch.tensor(labels).long(), weight=torch.tensor(weight),
        ignore_index=IGNORE, reduction="none",
    )  # fmt: skip
    all_pixels = losses.weighted_pixel_ce(logits, labels, weight, reduction="all_pixels")
    assert float(all_pixels) == pytest.approx(none.mean().item(), rel=1e-6)
    # Uniform weights are the plain CE averaged over valid pixels.
    uniform = losses.weighted_pixel_ce(logits, labels, np.full(5, 2.0, np.float32))
    valid = labels != IGNORE
    plain = np.asarray(losses.pixel_ce_map(logits, labels))[valid].mean()
    assert float(uniform) == pytest.approx(float(plain), rel=1e-6)


def test_weighted_ce_all_ignored_is_zero_not_nan():
    logits, labels, weight = _case(3)
    labels[:] = IGNORE
    assert float(losses.weighted_pixel_ce(logits, labels, weight)) == 0.0
    with pytest.raises(ValueError, match="class_weight"):
        losses.weighted_pixel_ce(logits, labels, weight[:3])


def _slot_labels(labels: np.ndarray, topk: np.ndarray) -> np.ndarray:
    """The relabelling written out: the slot whose id is the pixel's class, else ignore."""
    out = np.full(labels.shape, IGNORE, np.int64)
    for b in range(labels.shape[0]):
        for j, cls in enumerate(topk[b]):
            if cls >= 0:
                out[b][labels[b] == cls] = j
    return out


def test_slot_ce_uses_each_slots_class_weight(torch):
    rng = np.random.default_rng(7)
    n_cls, k = 9, 4
    labels = rng.integers(0, n_cls, (2, 8, 6)).astype(np.int32)
    labels[0, :2] = IGNORE
    topk = np.array([[3, 0, 7, 5], [1, 3, -1, 8]], np.int32)  # image 1 has an empty slot
    slot_logits = rng.normal(size=(2, 8, 6, k)).astype(np.float32)
    weight = rng.uniform(0.1, 4.0, n_cls).astype(np.float32)
    ours = slot_ce(slot_logits, labels, topk, weight, IGNORE)
    slots = _slot_labels(labels, topk)
    F = torch.nn.functional
    sums, norms = 0.0, 0.0
    for b in range(2):
        slot_w = np.where(topk[b] >= 0, weight[np.maximum(topk[b], 0)], 0.0).astype(np.float32)
        x = torch.tensor(slot_logits[b : b + 1]).permute(0, 3, 1, 2)
        y = torch.tensor(slots[b : b + 1])
        one = F.cross_entropy(x, y, weight=torch.tensor(slot_w), ignore_index=IGNORE)
        alone = slot_ce(slot_logits[b : b + 1], labels[b : b + 1],
                                        topk[b : b + 1], weight, IGNORE)  # fmt: skip
        assert float(alone) == pytest.approx(one.item(), rel=1e-6)
        sums += F.cross_entropy(
            x, y, weight=torch.tensor(slot_w), ignore_index=IGNORE, reduction="sum"
        ).item()
        valid = slots[b] != IGNORE
        norms += float(slot_w[slots[b][valid]].sum())
    assert float(ours) == pytest.approx(sums / norms, rel=1e-6)
    # The weight follows the class, not the slot: permuting the slots changes nothing.
    perm = np.array([2, 0, 3, 1])
    permuted = slot_ce(slot_logits[..., perm], labels, topk[:, perm], weight)
    assert float(permuted) == pytest.approx(float(ours), rel=1e-6)
    # ...while keeping the slots and swapping the per-class weights does change it.
    swapped = weight.copy()
    swapped[[3, 7]] = swapped[[7, 3]]
    changed = slot_ce(slot_logits, labels, topk, swapped)
    assert abs(float(changed) - float(ours)) > 1e-4


def _mmseg_dice_torch(torch, logits, labels, smooth, exponent, class_weight, ignore_index):
    """mmseg 0.x DiceLoss.forward → dice_loss → binary_dice_loss, transcribed in torch."""
    F = torch.nn.functional
    pred = F.softmax(torch.tensor(logits).permute(0, 3, 1, 2), dim=1)
    target = torch.tensor(labels).long()
    num_classes = pred.shape[1]
    one_hot = F.one_hot(torch.clamp(target, 0, num_classes - 1), num_classes=num_classes)
    valid_mask = (target != ignore_index).long()
    total = 0
    for i in range(num_classes):
        if i != ignore_index:
            p = pred[:, i].reshape(pred.shape[0], -1)
            t = one_hot[..., i].reshape(one_hot.shape[0], -1)
            v = valid_mask.reshape(valid_mask.shape[0], -1)
            num = torch.sum(torch.mul(p, t) * v, dim=1) * 2 + smooth
            den = torch.sum(p.pow(exponent) + t.pow(exponent), dim=1) + smooth
            loss = (1 - num / den).mean()
            if class_weight is not None:
                loss = loss * class_weight[i]
            total = total + loss
    return (total / num_classes).item()


@pytest.mark.parametrize("weighted", [False, True])
def test_dice_loss_matches_mmseg(torch, weighted):
    logits, labels, weight = _case(11)
    cw = weight if weighted else None
    ours = losses.dice_loss(logits, labels, IGNORE, 1.0, 2.0, cw, loss_weight=3.0)
    ref = 3.0 * _mmseg_dice_torch(torch, logits, labels, 1.0, 2.0, cw, IGNORE)
    assert float(ours) == pytest.approx(ref, rel=1e-6)


def test_dice_loss_small_for_confident_correct_prediction():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 16, 16)).astype(np.int32)
    perfect = 30.0 * jax.nn.one_hot(labels, 4)
    wrong = 30.0 * jax.nn.one_hot((labels + 1) % 4, 4)
    good, bad = losses.dice_loss(perfect, labels), losses.dice_loss(wrong, labels)
    assert float(good) < 1e-3 and float(bad) > 0.9


def test_weighted_seg_loss_dispatch_and_uniform_weights_match_unweighted():
    """With uniform weights and the all-pixels reduction, the weighted loss is the existing
    decode.loss_seg for both heads; per-image values are the images alone."""
    rng = np.random.default_rng(5)
    n_cls, k = 6, 3
    labels = rng.integers(0, n_cls, (2, 16, 16)).astype(np.int32)
    labels[1, :4] = IGNORE
    config = {"seg_loss_weight": 1.0, "img_loss": "bce", "img_loss_weight": 0.0}
    config.update(gamma_neg=2.0, gamma_pos=0.0, clip=0.05, eps=1e-5)
    ones = np.ones(n_cls, np.float32)
    baseline = {"masks": rng.normal(size=(2, 8, 8, n_cls)).astype(np.float32), "topk": None}
    topk = np.array([[0, 2, 5], [1, 4, -1]], np.int32)
    rankseg = {"masks": rng.normal(size=(2, 8, 8, k)).astype(np.float32), "topk": topk}
    for outputs in (baseline, rankseg):
        terms = jax.jit(lambda o: losses.loss_terms(o, labels, config, n_cls, IGNORE))(outputs)
        batch, per_image = jax.jit(
            lambda o: losses.weighted_seg_loss(o, labels, ones, IGNORE, "all_pixels")
        )(outputs)
        assert float(batch) == pytest.approx(float(terms.metrics["decode.loss_seg"]), rel=1e-6)
        np.testing.assert_allclose(per_image, terms.per_image["decode.loss_seg"], rtol=1e-6)
    weight = rng.uniform(0.5, 2.0, n_cls).astype(np.float32)
    batch, per_image = losses.weighted_seg_loss(rankseg, labels, weight, IGNORE)
    logits = losses.upsample_logits(rankseg["masks"], (16, 16))
    alone = losses.weighted_slot_ce(logits[1:], labels[1:], topk[1:], weight, IGNORE)
    assert float(per_image[1]) == pytest.approx(float(alone), rel=1e-6)
    whole = losses.weighted_slot_ce(logits, labels, topk, weight, IGNORE)
    assert float(batch) == pytest.approx(float(whole), rel=1e-6)


def test_auxiliary_head_ce_takes_the_class_weights(torch):
    """The conv families' auxiliary CE (× aux_weight) is class-weighted like the decode head's:
    the batch value is torch's weighted mean over the batch, per image each image's own."""
    logits, labels, weight = _case(5, c=4)
    aux, _, _ = _case(6, c=4)
    cfg = dict(img_loss="none", seg_loss_weight=1.0, aux_weight=0.4)
    outputs = dict(masks=jnp.asarray(logits), topk=None, aux_masks=jnp.asarray(aux))
    _, metrics = losses.segmentation_losses(outputs, labels, cfg, 4, IGNORE, class_weight=weight)
    ce = torch.nn.functional.cross_entropy
    x = torch.tensor(aux).permute(0, 3, 1, 2)
    y, w = torch.tensor(labels).long(), torch.tensor(weight)
    ref = 0.4 * ce(x, y, weight=w, ignore_index=IGNORE).item()
    assert float(metrics["aux.loss_seg"]) == pytest.approx(ref, rel=1e-6)
    _, unweighted = losses.segmentation_losses(outputs, labels, cfg, 4, IGNORE)
    ref_plain = 0.4 * ce(x, y, ignore_index=IGNORE, reduction="none").mean().item()
    assert float(unweighted["aux.loss_seg"]) == pytest.approx(ref_plain, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(
        float(metrics["decode.loss_seg"]) + float(metrics["aux.loss_seg"]), rel=1e-6
    )
