"""Training losses and the logged metrics of Segmenter and Segmenter + RankSeg (spec section 3).

Everything is pure `jax.numpy`, jittable, and computed in float32 whatever the model's compute
dtype. The reference semantics that are easy to get wrong:

* the multi-label target is a histogram of the augmented crop label that drops the ignore value
  and anything outside [0, n_cls) (torch.histc);
* the asymmetric image loss (ASL) has eps 1e-5 and clip 0.05, and its gradient flows THROUGH
  the focusing weight (0⁰ = 1 for positives with gamma_pos = 0, with a zero gradient there, as
  torch.pow's backward gives);
* the pixel CE divides by ALL pixels, ignored ones included (mmseg 0.x), after a bilinear
  upsample (align_corners=False) of the slot logits to the label size;
* RankSeg relabels each pixel to the rank slot of its class in the *predicted* top-k, so pixels
  whose class the image head missed are ignored;
* the logged accuracies: `acc_seg` is a percentage over all pixels, the others are fractions
  averaged over the images whose value is finite (1 when none is).

Shapes: labels (B, H, W) int; slot logits (B, h, w, k) (k = n_cls for the baseline); top-k ids
(B, k) int32 in rank order (GT head: ascending class ids, −1 in padded slots); image logits
(B, n_cls).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rankseg_jax.errors import ConfigError

IMG_LOSSES = ("asl", "bce")
# Every key a head can log, in the reference's order.
LOG_KEYS = (
    "decode.loss_img",
    "decode.loss_seg",
    "decode.acc_seg",
    "decode.acc_pix",
    "decode.acc_img",
    "decode.acc_img_accuracy",
    "loss",
)


class LossTerms(NamedTuple):
    """What one training forward logs.

    total: the scalar to differentiate (= metrics['loss']).
    metrics: scalars with the reference's log keys (decode.loss_seg, decode.acc_seg, ...; RankSeg
      adds decode.loss_img, decode.acc_pix, decode.acc_img, decode.acc_img_accuracy) and `loss`.
    per_image: the same keys as (B,) arrays, each image's value as if it were alone in the batch
      (the reference's 1-image-per-GPU runs; an image without valid pixels gets recall 1).
    """

    total: jax.Array
    metrics: dict[str, jax.Array]
    per_image: dict[str, jax.Array]


# --------------------------------------------------------------------------------------------
# Targets and relabelling
# --------------------------------------------------------------------------------------------


def class_histogram(labels: jax.Array, n_cls: int) -> jax.Array:
    """Pixel count per class, (B, H, W) int → (B, n_cls) int32.

    torch.histc(bins=n_cls, min=0, max=n_cls − 1) semantics: integer class c counts in bin c;
    the ignore value and anything outside [0, n_cls) are not counted. A scatter-add (bincount),
    so memory stays O(B·H·W) rather than a (B, H, W, n_cls) one-hot.
    """
    flat = labels.reshape(labels.shape[0], -1)
    bins = jnp.where((flat >= 0) & (flat < n_cls), flat, n_cls).astype(jnp.int32)
    count = jax.vmap(lambda row: jnp.bincount(row, length=n_cls + 1))(bins)
    return count[:, :n_cls].astype(jnp.int32)


def multi_hot(labels: jax.Array, n_cls: int) -> jax.Array:
    """Multi-label image target (spec 3.1): (B, H, W) int → (B, n_cls) float32, 1 = present."""
    return (class_histogram(labels, n_cls) > 0).astype(jnp.float32)


def relabel_to_slots(labels: jax.Array, topk: jax.Array, ignore_index: int) -> jax.Array:
    """Pixel class → its rank slot: label'[b, p] = j if topk[b, j] == label[b, p], else ignore.

    labels (B, H, W) int, topk (B, k) int (negative ids are empty slots and match nothing)
    → (B, H, W) int32 in [0, k) ∪ {ignore_index}. Ignored pixels and labels that are no top-k
    id become ignore_index. The (B, H·W, k) compare is reduced right away, so XLA fuses it and
    never materialises it.
    """
    if labels.ndim != 3 or topk.ndim != 2 or labels.shape[0] != topk.shape[0]:
        raise ValueError(
            f"relabel_to_slots: labels (B, H, W) and topk (B, k) expected, got "
            f"{labels.shape} and {topk.shape}"
        )
    flat = labels.reshape(labels.shape[0], -1, 1).astype(jnp.int32)
    ids = topk.astype(jnp.int32)[:, None, :]
    match = (flat == ids) & (ids >= 0)
    slots = jnp.where(match.any(-1), jnp.argmax(match, axis=-1), ignore_index)
    return slots.reshape(labels.shape).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Image-level losses (spec 3.2)
# --------------------------------------------------------------------------------------------


def _clamp_max(x: jax.Array, hi: float) -> jax.Array:
    """min(x, hi) with torch.clamp's gradient: passed through where x ≤ hi (inclusive)."""
    return jnp.where(x > hi, hi, x)


def _clamp_min(x: jax.Array, lo: float) -> jax.Array:
    """max(x, lo) with torch.clamp's gradient: passed through where x ≥ lo (inclusive)."""
    return jnp.where(x < lo, lo, x)


def _focusing_weight(base: jax.Array, exponent: jax.Array) -> jax.Array:
    """base ** exponent with torch.pow's gradient: 1 and a zero gradient where exponent is 0.

    A bare jnp.power would give 0·0⁻¹ = NaN for the gradient at base 0, exponent 0 (a
    saturated positive with gamma_pos = 0).
    """
    zero = exponent == 0
    return jnp.where(zero, 1.0, jnp.power(jnp.where(zero, 1.0, base), exponent))


def asymmetric_loss_elements(
    logits: jax.Array,
    targets: jax.Array,
    gamma_neg: float = 2.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-5,
) -> jax.Array:
    """Per-entry ASL (B, n_cls) float32, the NEGATED log-likelihood (so ≥ 0); the loss is its
    mean over all B·n_cls entries. The gradient flows through the focusing weight."""
    x = logits.astype(jnp.float32)
    y = targets.astype(jnp.float32)
    xs_pos = jax.nn.sigmoid(x)
    xs_neg = 1.0 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = _clamp_max(xs_neg + clip, 1.0)
    loss = y * jnp.log(_clamp_min(xs_pos, eps)) + (1 - y) * jnp.log(_clamp_min(xs_neg, eps))
    if gamma_neg > 0 or gamma_pos > 0:
        base = 1 - xs_pos * y - xs_neg * (1 - y)
        loss = loss * _focusing_weight(base, gamma_pos * y + gamma_neg * (1 - y))
    return -loss


def asymmetric_loss(
    logits: jax.Array,
    targets: jax.Array,
    gamma_neg: float = 2.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
    eps: float = 1e-5,
) -> jax.Array:
    """AsymmetricLoss of mmseg's bce_loss.py, logits/targets (B, n_cls) → scalar: the mean over
    all B·n_cls entries. Defaults are the RankSeg configs' (gamma_neg 2, gamma_pos 0); clip and
    eps are the class defaults (eps 1e-5, not the ASL paper's 1e-8)."""
    return jnp.mean(asymmetric_loss_elements(logits, targets, gamma_neg, gamma_pos, clip, eps))


def bce_loss_elements(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-entry BCEWithLogits (B, n_cls) float32: (1 − y)·x − log σ(x), stable for any x."""
    x = logits.astype(jnp.float32)
    return (1 - targets.astype(jnp.float32)) * x - jax.nn.log_sigmoid(x)


def bce_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """nn.BCEWithLogitsLoss(reduction='mean'): the mean over B·n_cls (the RankSeg head's default
    image loss, used by the COCO-Stuff ViT-B configs)."""
    return jnp.mean(bce_loss_elements(logits, targets))


# --------------------------------------------------------------------------------------------
# Pixel loss and accuracy (spec 3.3, 3.4)
# --------------------------------------------------------------------------------------------


def upsample_logits(logits: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, C) → (B, H, W, C) float32, torch bilinear with align_corners=False (mmseg
    `resize`); a no-op when the size already matches."""
    x = logits.astype(jnp.float32)
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    shape = (x.shape[0], int(size[0]), int(size[1]), x.shape[-1])
    return jax.image.resize(x, shape, method="linear", antialias=False)


def _valid(labels: jax.Array, n_channels: int) -> jax.Array:
    return (labels >= 0) & (labels < n_channels)


def pixel_ce_map(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-pixel CE (B, H, W) float32 of logits (B, H, W, C) at label resolution; 0 where the
    label is not in [0, C) (ignore_index, which the configs keep ≥ n_cls)."""
    x = logits.astype(jnp.float32)
    valid = _valid(labels, x.shape[-1])
    index = jnp.where(valid, labels, 0).astype(jnp.int32)
    picked = jnp.take_along_axis(x, index[..., None], axis=-1)[..., 0]
    ce = jax.nn.logsumexp(x, axis=-1) - picked
    return jnp.where(valid, ce, 0.0)


def pixel_ce_all_pixels(logits: jax.Array, labels: jax.Array, ignore_index: int = 255) -> jax.Array:
    """mmseg-0.x CrossEntropyLoss: per-pixel CE, 0 at ignored pixels, mean over ALL B·H·W pixels
    (ignored ones stay in the denominator). logits (B, H, W, C) at label resolution (upsample
    first with `upsample_logits`), labels (B, H, W) int. Labels outside [0, C), ignore_index
    included, count as ignored (torch would raise for a non-ignore out-of-range label)."""
    del ignore_index  # any label outside [0, C) is ignored; kept for the reference's signature
    return jnp.mean(pixel_ce_map(logits, labels))


def correct_pixels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """(B, H, W) bool: argmax over C equals the label (never true at ignored pixels)."""
    pred = jnp.argmax(logits, axis=-1)
    return (pred == labels) & _valid(labels, logits.shape[-1])


def pixel_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """`decode.acc_seg`: 100 · #(argmax == label) / #ALL pixels, a scalar percentage."""
    return 100.0 * jnp.mean(correct_pixels(logits, labels).astype(jnp.float32))


# --------------------------------------------------------------------------------------------
# Top-k metrics (spec 3.4)
# --------------------------------------------------------------------------------------------


def _gather_classes(values: jax.Array, topk: jax.Array) -> jax.Array:
    """values (B, n_cls) at the ids topk (B, k); empty slots (id < 0) give 0."""
    picked = jnp.take_along_axis(values, jnp.maximum(topk, 0).astype(jnp.int32), axis=1)
    return jnp.where(topk >= 0, picked, 0)


def topk_recalls(hist: jax.Array, topk: jax.Array) -> dict[str, jax.Array]:
    """Per-image top-k metrics, (B,) float32 each (NaN for an image without valid pixels).

    acc_pix: Σ_{c∈topk} hist_c / Σ_c hist_c (fraction of valid pixels whose class is in the
    top-k); acc_img: |topk ∩ present| / |present|; acc_img_accuracy: |topk ∩ present| / k, k the
    number of filled slots (id ≥ 0). hist (B, n_cls) int, topk (B, k) int.
    """
    hist = hist.astype(jnp.float32)
    present = (hist > 0).astype(jnp.float32)
    filled = jnp.sum((topk >= 0).astype(jnp.float32), axis=1)
    hits = jnp.sum(_gather_classes(present, topk), axis=1)
    return {
        "acc_pix": jnp.sum(_gather_classes(hist, topk), axis=1) / jnp.sum(hist, axis=1),
        "acc_img": hits / jnp.sum(present, axis=1),
        "acc_img_accuracy": hits / filled,
    }


def finite_mean(values: jax.Array, default: float = 1.0) -> jax.Array:
    """Mean over the finite entries of values (B,); `default` when none is finite.

    The reference's batch averaging of acc_pix / acc_img (NaN dropped; 1 when the whole batch
    has no valid pixel, which is exactly when no entry is finite).
    """
    finite = jnp.isfinite(values)
    count = jnp.sum(finite)
    total = jnp.sum(jnp.where(finite, values, 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), default)


# --------------------------------------------------------------------------------------------
# Everything a training step logs
# --------------------------------------------------------------------------------------------


def image_loss_elements(
    logits: jax.Array, targets: jax.Array, loss_config: Mapping[str, Any]
) -> jax.Array:
    """Per-entry image loss (B, n_cls), unweighted, chosen by `loss_config.img_loss`."""
    name = loss_config["img_loss"]
    if name == "asl":
        return asymmetric_loss_elements(
            logits,
            targets,
            gamma_neg=float(loss_config["gamma_neg"]),
            gamma_pos=float(loss_config["gamma_pos"]),
            clip=float(loss_config["clip"]),
            eps=float(loss_config["eps"]),
        )
    if name == "bce":
        return bce_loss_elements(logits, targets)
    raise ConfigError(f"loss.img_loss={name!r} is not one of {', '.join(IMG_LOSSES)}")


def _check_shapes(masks: jax.Array, labels: jax.Array, topk, img_logits, n_cls: int) -> None:
    if masks.ndim != 4 or labels.ndim != 3 or masks.shape[0] != labels.shape[0]:
        raise ValueError(
            f"losses: masks (B, h, w, k) and labels (B, H, W) expected, got {masks.shape} and "
            f"{labels.shape}"
        )
    if topk is None and masks.shape[-1] != n_cls:
        raise ValueError(f"losses: baseline masks have {masks.shape[-1]} channels, n_cls={n_cls}")
    if topk is not None and topk.shape != (masks.shape[0], masks.shape[-1]):
        raise ValueError(f"losses: topk {topk.shape} does not fit masks {masks.shape}")
    if img_logits is not None and img_logits.shape != (masks.shape[0], n_cls):
        raise ValueError(f"losses: img_logits {img_logits.shape}, expected (B, {n_cls})")


def loss_terms(
    outputs: Mapping[str, Any],
    labels: jax.Array,
    loss_config: Mapping[str, Any],
    n_cls: int,
    ignore_index: int = 255,
) -> LossTerms:
    """Losses and logged metrics of one forward, per image and reduced (see LossTerms).

    outputs: the model's dict — masks (B, h, w, k) slot logits, topk (B, k) int or None,
    img_logits (B, n_cls) or None. The head kind follows from it:
      * baseline (topk None): CE on the class logits; keys decode.loss_seg, decode.acc_seg.
      * RankSeg (topk and img_logits): CE on the slot-relabelled label + image loss
        (`loss_config.img_loss` 'asl' or 'bce') × `img_loss_weight`, and the top-k metrics.
      * GT oracle (topk, img_logits None; −1 ids in padded slots): the relabelled CE and the
        top-k metrics, no image loss.
    labels (B, H, W) int, the augmented crop label; the slot logits are upsampled to its size.
    `loss_config` needs img_loss, img_loss_weight, gamma_neg, gamma_pos, clip, eps,
    seg_loss_weight (the config schema's `loss`, rankseg_jax/config.py).

    Reductions follow the reference: loss_seg and acc_seg are means over all B·H·W pixels (=
    the mean of the per-image values, all crops having one size), loss_img the mean over
    B·n_cls. acc_pix / acc_img: RankSeg averages the finite per-image values over the batch (1
    if none is finite; spec 3.4); the GT head, whose reference runs image by image, averages
    per-image values where an image without valid pixels counts 1.
    """
    masks, topk, img_logits = outputs["masks"], outputs.get("topk"), outputs.get("img_logits")
    _check_shapes(masks, labels, topk, img_logits, n_cls)
    labels = labels.astype(jnp.int32)
    logits = upsample_logits(masks, labels.shape[1:])
    target = labels if topk is None else relabel_to_slots(labels, topk, ignore_index)
    seg_weight = float(loss_config["seg_loss_weight"])
    per_image = {
        "decode.loss_seg": seg_weight * jnp.mean(pixel_ce_map(logits, target), axis=(1, 2)),
        "decode.acc_seg": 100.0
        * jnp.mean(correct_pixels(logits, target).astype(jnp.float32), axis=(1, 2)),
    }
    metrics = {key: jnp.mean(value) for key, value in per_image.items()}
    if img_logits is not None:
        elements = image_loss_elements(img_logits, multi_hot(labels, n_cls), loss_config)
        per_image["decode.loss_img"] = float(loss_config["img_loss_weight"]) * jnp.mean(
            elements, axis=1
        )
        metrics["decode.loss_img"] = jnp.mean(per_image["decode.loss_img"])
    if topk is not None:
        recalls = topk_recalls(class_histogram(labels, n_cls), topk)
        for name, values in recalls.items():
            key = f"decode.{name}"
            alone = jnp.where(jnp.isfinite(values), values, 1.0)  # the reference at B = 1
            per_image[key] = alone
            metrics[key] = jnp.mean(alone) if img_logits is None else finite_mean(values)
    loss_keys = [key for key in metrics if "loss" in key]
    metrics["loss"] = sum(metrics[key] for key in loss_keys)
    per_image["loss"] = sum(per_image[key] for key in loss_keys)
    metrics, per_image = _in_log_order(metrics), _in_log_order(per_image)
    return LossTerms(total=metrics["loss"], metrics=metrics, per_image=per_image)


def _in_log_order(values: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The reference's log order (loss_img first, `loss` last)."""
    return {key: values[key] for key in LOG_KEYS if key in values}


def segmentation_losses(
    outputs: Mapping[str, Any],
    labels: jax.Array,
    loss_config: Mapping[str, Any],
    n_cls: int,
    ignore_index: int = 255,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss scalar, metrics dict of scalars) for one training forward; see `loss_terms`.

    Use as `jax.value_and_grad(lambda p: segmentation_losses(model.apply(...), ...),
    has_aux=True)`.
    """
    terms = loss_terms(outputs, labels, loss_config, n_cls, ignore_index)
    if outputs.get("aux_masks") is not None:
        weight = float(loss_config["aux_weight"])
        terms = with_aux_terms(terms, outputs["aux_masks"], labels, weight)
    return terms.total, terms.metrics


def with_aux_terms(
    terms: LossTerms, aux_masks: jax.Array, labels: jax.Array, weight: float
) -> LossTerms:
    """`terms` plus the auxiliary head's `aux.loss_seg` (weight × pixel CE, mmseg's FCNHead
    auxiliary loss) and `aux.acc_seg`; `loss` includes it.

    aux_masks (B, h, w, n_cls) logits, upsampled to the labels (B, H, W) as the decode head's.
    """
    metrics, per_image = dict(terms.metrics), dict(terms.per_image)
    total, total_per_image = metrics.pop("loss"), per_image.pop("loss")
    aux = upsample_logits(aux_masks, labels.shape[1:])
    labels = labels.astype(jnp.int32)
    ce = weight * jnp.mean(pixel_ce_map(aux, labels), axis=(1, 2))
    acc = 100.0 * jnp.mean(correct_pixels(aux, labels).astype(jnp.float32), axis=(1, 2))
    per_image["aux.loss_seg"], per_image["aux.acc_seg"] = ce, acc
    metrics["aux.loss_seg"], metrics["aux.acc_seg"] = jnp.mean(ce), jnp.mean(acc)
    metrics["loss"], per_image["loss"] = total + metrics["aux.loss_seg"], total_per_image + ce
    return LossTerms(total=metrics["loss"], metrics=metrics, per_image=per_image)


# --------------------------------------------------------------------------------------------
# Class-weighted pixel CE, its RankSeg rank-slot variant, and mmseg's DiceLoss (issue 16)
# --------------------------------------------------------------------------------------------

CE_REDUCTIONS = ("weighted_mean", "all_pixels")


def _reduce_weighted(ce: jax.Array, weight: jax.Array, reduction: str) -> jax.Array:
    """Σ w·ce / Σ w over valid pixels (torch `F.cross_entropy(weight=...)`'s 'mean'; 0 when no
    pixel has weight, where torch gives NaN), or Σ w·ce / #all pixels (mmseg 0.x
    `CrossEntropyLoss(class_weight=...)`, whose `weight_reduce_loss` averages over every
    element)."""
    total = jnp.sum(weight * ce)
    if reduction == "weighted_mean":
        norm = jnp.sum(weight)
        return jnp.where(norm > 0, total / jnp.where(norm > 0, norm, 1.0), 0.0)
    if reduction == "all_pixels":
        return total / ce.size
    raise ValueError(f"reduction={reduction!r} is not one of {', '.join(CE_REDUCTIONS)}")


def weighted_pixel_ce(
    logits: jax.Array,
    labels: jax.Array,
    class_weight: jax.Array,
    reduction: str = "weighted_mean",
) -> jax.Array:
    """Class-weighted pixel CE: logits (B, H, W, C) at label resolution, labels (B, H, W) int,
    class_weight (C,) → scalar float32.

    Each valid pixel (label in [0, C); ignore_index is outside) contributes w[label]·CE, and
    the default reduction divides by Σ w[label] over the valid pixels, which is exactly
    `torch.nn.functional.cross_entropy(logits, labels, weight=w, ignore_index=...)`.
    `reduction='all_pixels'` divides by B·H·W instead (mmseg 0.x with `class_weight`).
    """
    x = logits.astype(jnp.float32)
    weight = jnp.asarray(class_weight, jnp.float32)
    if weight.shape != (x.shape[-1],):
        raise ValueError(
            f"class_weight has shape {weight.shape}, logits have {x.shape[-1]} classes"
        )
    valid = _valid(labels, x.shape[-1])
    pixel_weight = jnp.where(valid, weight[jnp.where(valid, labels, 0).astype(jnp.int32)], 0.0)
    return _reduce_weighted(pixel_ce_map(x, labels), pixel_weight, reduction)


def slot_class_weights(topk: jax.Array, class_weight: jax.Array) -> jax.Array:
    """The weight of each rank slot's class: topk (B, k) int ids → (B, k) float32; an empty
    slot (id < 0) weighs 0."""
    weight = jnp.asarray(class_weight, jnp.float32)
    picked = weight[jnp.maximum(topk, 0).astype(jnp.int32)]
    return jnp.where(topk >= 0, picked, 0.0)


def weighted_slot_ce(
    slot_logits: jax.Array,
    labels: jax.Array,
    topk: jax.Array,
    class_weight: jax.Array,
    ignore_index: int = 255,
    reduction: str = "weighted_mean",
) -> jax.Array:
    """RankSeg's rank-slot relabelled CE with class weights: the weight follows the class.

    slot_logits (B, H, W, k) at label resolution, labels (B, H, W) class ids, topk (B, k) the
    class id in each slot, class_weight (n_cls,). Pixels are relabelled to their class's slot
    (`relabel_to_slots`; classes the image head missed are ignored) and slot j of image b
    weighs class_weight[topk[b, j]]. For one image this is `F.cross_entropy(slot_logits,
    slot_labels, weight=class_weight[topk[0]], ignore_index=...)`; a batch sums w·CE and w
    over all its images before dividing (one weighted mean over the batch's pixels).
    """
    x = slot_logits.astype(jnp.float32)
    slots = relabel_to_slots(labels, topk, ignore_index)
    weights = slot_class_weights(topk, class_weight)  # (B, k)
    valid = _valid(slots, x.shape[-1])
    index = jnp.where(valid, slots, 0).astype(jnp.int32)
    pixel_weight = jnp.take_along_axis(weights, index.reshape(index.shape[0], -1), axis=1)
    pixel_weight = jnp.where(valid, pixel_weight.reshape(index.shape), 0.0)
    return _reduce_weighted(pixel_ce_map(x, slots), pixel_weight, reduction)


def dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    ignore_index: int = 255,
    smooth: float = 1.0,
    exponent: float = 2.0,
    class_weight: jax.Array | None = None,
    loss_weight: float = 1.0,
) -> jax.Array:
    """mmseg 0.x `DiceLoss` (the RankSeg fork's): logits (B, H, W, C), labels (B, H, W) → scalar.

    As mmseg computes it, quirks included: p = softmax over C; the one-hot target of
    clamp(label, 0, C − 1) (so an ignored pixel is a one-hot of the LAST class); per image and
    class

        dice = 1 − (2·Σ p·t·valid + smooth) / (Σ (p^e + t^e) + smooth)

    where only the numerator is masked by valid = (label != ignore_index); the loss is
    loss_weight · Σ_c w_c · mean_b(dice) / C (a class whose index equals ignore_index is
    skipped in the sum but still counted in C).
    """
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    n_cls = p.shape[-1]
    target = jax.nn.one_hot(jnp.clip(labels, 0, n_cls - 1), n_cls, dtype=jnp.float32)
    valid = (labels != ignore_index).astype(jnp.float32)[..., None]
    axes = (1, 2)
    num = 2.0 * jnp.sum(p * target * valid, axis=axes) + smooth  # (B, C)
    den = jnp.sum(p**exponent + target**exponent, axis=axes) + smooth
    per_class = jnp.mean(1.0 - num / den, axis=0)  # (C,)
    if class_weight is not None:
        per_class = per_class * jnp.asarray(class_weight, jnp.float32)
    if 0 <= ignore_index < n_cls:
        per_class = per_class.at[ignore_index].set(0.0)
    return loss_weight * jnp.sum(per_class) / n_cls


def weighted_seg_loss(
    outputs: Mapping[str, Any],
    labels: jax.Array,
    class_weight: jax.Array,
    ignore_index: int = 255,
    reduction: str = "weighted_mean",
) -> tuple[jax.Array, jax.Array]:
    """The class-weighted `decode.loss_seg` of any head: (batch scalar, per-image (B,)).

    outputs as `loss_terms` takes them: masks (B, h, w, k) are upsampled to the label size;
    without `topk` (baseline) the CE is on the class channels (`weighted_pixel_ce`), with it
    (RankSeg, GT oracle) on the relabelled slots with each slot's class weight
    (`weighted_slot_ce`). Per-image values are each image's own weighted mean, as if alone
    in the batch (the reference's one-image-per-GPU logs); the scalar is the batch's.
    """
    masks, topk = outputs["masks"], outputs.get("topk")
    labels = labels.astype(jnp.int32)
    logits = upsample_logits(masks, labels.shape[1:])
    if topk is None:
        one = lambda x, y: weighted_pixel_ce(x[None], y[None], class_weight, reduction)
        batch = weighted_pixel_ce(logits, labels, class_weight, reduction)
        per_image = jax.vmap(one)(logits, labels)
    else:
        one = lambda x, y, t: weighted_slot_ce(
            x[None], y[None], t[None], class_weight, ignore_index, reduction
        )
        batch = weighted_slot_ce(logits, labels, topk, class_weight, ignore_index, reduction)
        per_image = jax.vmap(one)(logits, labels, topk)
    return batch, per_image
