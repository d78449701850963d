"""Sliding-window inference, resize, ms+flip and the eval loop against torch references.

The model is the toy segmenter of `rankseg_testing.toy_segmenter` (16x16 patches, a
grid-position term, bilinear back to the window size; optional RankSeg top-k with -100 fill),
written in both JAX and torch. Tolerances: probabilities within 1e-5 absolute (float32 sums
in a different order), argmax exactly equal.
"""

from __future__ import annotations

from functools import partial

import cv2
import jax
import numpy as np
import pytest

from rankseg_jax import evaluation, metrics
from rankseg_jax import inference as ev
from rankseg_jax.config import with_defaults
from rankseg_jax.errors import InputError
from rankseg_testing import toy_segmenter as toy

N_CLS = 7
PROB_TOL = 1e-5


def make_inferencer(topk=0, n_cls=N_CLS, **overrides):
    params = toy.toy_params(n_cls, seed=3)
    settings = dict(crop=(32, 48), stride=(24, 32), window_batch=3, tile=(16, 32))
    settings.update(overrides)
    if topk:
        settings["rankseg_fill"] = toy.FILL
    config = ev.InferenceConfig(**settings)
    encode = partial(toy.jax_encode_decode, topk=topk)
    return ev.Inferencer(encode, params, n_cls, config), params


def torch_model(params, topk):
    return lambda x: toy.torch_encode_decode(params, x, topk=topk)


def to_torch(torch, image):
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


def test_slide_windows_follow_the_reference_formula():
    """Last window flush with the edge, overlaps, and a short side giving one short window."""
    assert ev.slide_windows(100, 64, (64, 64), (64, 64)) == [(0, 64, 0, 64), (36, 100, 0, 64)]
    assert ev.slide_windows(30, 20, (64, 64), (64, 64)) == [(0, 30, 0, 20)]
    rows = [(y1, y2) for y1, y2, _, _ in ev.slide_windows(100, 10, (48, 48), (32, 32))]
    assert rows == [(0, 48), (32, 80), (52, 100)]
    for h, w in [(100, 130), (47, 300), (20, 33)]:
        count = np.zeros((h, w))
        for y1, y2, x1, x2 in ev.slide_windows(h, w, (48, 64), (32, 40)):
            assert (y2 - y1, x2 - x1) == (min(48, h), min(64, w))
            count[y1:y2, x1:x2] += 1
        cy, cx = ev.window_coverage(h, w, (48, 64), (32, 40))
        np.testing.assert_array_equal(np.outer(cy, cx), count)


def test_rescale_size_follows_mmcv():
    assert ev.rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert ev.rescale_size(375, 500, (2048, 512)) == (512, 683)
    assert ev.rescale_size(300, 1500, (2048, 512)) == (410, 2048)
    assert ev.rescale_size(375, 500, (1024, 256)) == (256, 341)


def test_normalize_matches_mmcv_imnormalize():
    """Bit-identical to mmcv's cv2.subtract / cv2.multiply(1 / std) in place."""
    image = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    stats = [((127.5,) * 3, (127.5,) * 3), ((123.675, 116.28, 103.53), (58.4, 57.1, 57.4))]
    for mean, std in stats:
        ref = image.astype(np.float32)
        cv2.subtract(ref, np.float64(np.reshape(mean, (1, -1))), ref)
        cv2.multiply(ref, 1 / np.float64(np.reshape(std, (1, -1))), ref)
        np.testing.assert_array_equal(ev.normalize_image(image, mean, std), ref)


@pytest.mark.parametrize(
    "size, out_size",
    [((13, 17), (40, 29)), ((40, 50), (13, 17)), ((21, 9), (21, 30)), ((16, 16), (16, 16))],
)
@pytest.mark.parametrize("flip", [False, True])
def test_resize_matches_torch_bilinear(torch, size, out_size, flip):
    """On-device tiled resize (traced sizes, bucketed canvas) = torch bilinear, up and down."""
    rng = np.random.default_rng(1)
    (h, w), (out_h, out_w), n_cls, tile = size, out_size, 5, (8, 16)
    canvas = np.zeros((64, 64, n_cls), np.float32)
    canvas[:h, :w] = rng.normal(size=(h, w, n_cls)) * 10
    cy = np.pad(rng.integers(1, 4, h), (0, 64 - h)).astype(np.float32)
    cx = np.pad(rng.integers(1, 4, w), (0, 64 - w)).astype(np.float32)
    step = jax.jit(partial(ev.resized_tile, tile=tile))
    sizes = np.array([h, w, out_h, out_w], np.int32)
    out = np.zeros((out_h + tile[0], out_w + tile[1], n_cls), np.float32)
    for y in range(0, out_h, tile[0]):
        for x in range(0, out_w, tile[1]):
            origin = np.array([y, x], np.int32)
            out[y : y + tile[0], x : x + tile[1]] = step(canvas, cy, cx, sizes, origin, flip)
    mean = canvas[:h, :w] / (cy[:h, None, None] * cx[None, :w, None])
    ref = torch.nn.functional.interpolate(
        to_torch(torch, mean), size=(out_h, out_w), mode="bilinear", align_corners=False
    )
    if flip:
        ref = ref.flip(dims=(3,))
    ref = ref[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out[:out_h, :out_w], ref, atol=1e-5, rtol=1e-6)


CASES = [
    ((20, 30), (41, 17)),  # smaller than the crop on both sides, resized up and down
    ((32, 100), (32, 100)),  # full-height windows, overlapping columns, no resize
    ((70, 48), (35, 96)),  # overlapping rows, one column
    ((50, 90), (61, 77)),  # overlaps in both directions
    ((28, 75), (28, 75)),  # short side below the crop, several columns
]


@pytest.mark.parametrize("topk", [0, 3], ids=["mask", "rankseg"])
def test_slide_matches_torch_reference(torch, topk):
    """Probabilities and argmax of the slide inference equal mmseg's, flipped or not."""
    inferencer, params = make_inferencer(topk)
    model = torch_model(params, topk)
    rng = np.random.default_rng(2)
    unions = []
    for (h, w), out_size in CASES:
        image = rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)
        for flip in (False, True):
            got = inferencer.predict(image, out_size, flip=flip, return_probs=True)
            view = image[:, ::-1] if flip else image
            ref = toy.torch_inference(
                model, to_torch(torch, view), out_size, (32, 48), (24, 32), N_CLS, flip=flip
            )
            ref = ref[0].permute(1, 2, 0).numpy()
            np.testing.assert_allclose(got.probs, ref, atol=PROB_TOL)
            np.testing.assert_array_equal(got.pred, ref.argmax(-1))
            if topk:
                unions.append(got.selected.sum())
    if topk:  # windows chose different top-k somewhere, so the overlaps are really tested
        assert max(unions) > topk and min(unions) >= topk


def test_whole_mode_matches_torch(torch):
    inferencer, params = make_inferencer(0, mode="whole")
    image = np.random.default_rng(4).uniform(-1, 1, (37, 58, 3)).astype(np.float32)
    got = inferencer.predict(image, (50, 41), return_probs=True)
    ref = toy.torch_inference(
        torch_model(params, 0), to_torch(torch, image), (50, 41), None, None, N_CLS, mode="whole"
    )
    np.testing.assert_allclose(got.probs, ref[0].permute(1, 2, 0).numpy(), atol=PROB_TOL)


def random_uint8_image(rng, h, w):
    """A smooth-ish uint8 RGB image (so the rescales matter but are not pure noise)."""
    small = rng.integers(0, 256, (max(h // 4, 2), max(w // 4, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@pytest.mark.parametrize("topk", [0, 3], ids=["mask", "rankseg"])
def test_ms_flip_matches_torch_aug_test(torch, topk):
    """Multi-scale + flip: cv2 rescale, flip, normalise, slide, softmax, unflip, mean, argmax."""
    inferencer, params = make_inferencer(topk, crop=(32, 32), stride=(24, 24))
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    test_scale, ratios = (128, 40), (0.5, 0.75, 1.0, 1.5)
    image = random_uint8_image(np.random.default_rng(5), 45, 70)
    passes = ev.image_passes(
        image, mean=mean, std=std, test_scale=test_scale, ratios=ratios, flip=True
    )
    assert len(passes) == 2 * len(ratios)
    got = inferencer.predict_passes(passes, image.shape[:2], return_probs=True)
    scales = ev.ms_scales(test_scale, ratios)
    probs, pred = toy.torch_aug_test(
        torch_model(params, topk), image, scales, True, mean, std, (32, 32), (24, 24), N_CLS
    )
    np.testing.assert_allclose(got.probs, probs.transpose(1, 2, 0), atol=PROB_TOL)
    np.testing.assert_array_equal(got.pred, pred)


def test_compilations_are_bounded_across_image_sizes():
    """Twelve image sizes (one smaller than the crop) compile a fixed, small set of programs.

    Bound: the model once per window shape (full crop, plus each smaller window shape); per
    canvas bucket one canvas zeros and one tile program; the merge once per (bucket, window
    shape) pair; one zeros for the output tile. A second round of new sizes in the same
    buckets compiles nothing. n_cls = 11 is used by no other test, so no program is cached.
    """
    n_cls = 11
    multiple = 64
    inferencer, _ = make_inferencer(
        0, n_cls=n_cls, crop=(32, 32), stride=(32, 32), canvas_multiple=multiple
    )
    sizes = [(32, w) for w in (32, 40, 50, 63, 64, 70, 90, 100, 120, 128)] + [(20, 30), (32, 20)]
    rng = np.random.default_rng(6)

    def run(sizes):
        jobs = []
        for h, w in sizes:
            image = rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)
            out = (int(rng.integers(10, 90)), int(rng.integers(10, 90)))
            label = rng.integers(0, n_cls, out).astype(np.int32)
            jobs.append(inferencer.make_job([(image, False)], out, label=label))
        with ev.count_compilations() as names:
            done = list(inferencer.run(jobs))
        assert len(done) == len(sizes) and all(d.counts.sum() > 0 for d in done)
        return names

    names = run(sizes)
    window_shapes = {(min(h, 32), min(w, 32)) for h, w in sizes}
    assert sorted(set(names)) == [
        "jit(_finish_tile)", "jit(_merge_windows)", "jit(forward)", "jit(zeros)"
    ]  # fmt: skip
    buckets = {(-(-h // multiple), -(-w // multiple)) for h, w in sizes}
    pairs = {(-(-h // multiple), -(-w // multiple), min(h, 32), min(w, 32)) for h, w in sizes}
    bound = len(window_shapes) + 2 * len(buckets) + len(pairs) + 1
    assert len(sizes) >= 10 and bound == 3 + 4 + 4 + 1
    assert 0 < len(names) <= bound, (len(names), bound, names)
    again = run([(32, w) for w in (33, 45, 60, 99, 110, 127)] + [(20, 30), (32, 20)])
    assert again == [], again
    new_small_window = run([(21, 31)])  # a new sub-crop window shape: the model and its merge
    assert sorted(new_small_window) == ["jit(_merge_windows)", "jit(forward)"], new_small_window


def test_evaluation_loop_scores_and_ceilings():
    """run_evaluation = per-image predict + mmseg counts over the eval pipeline; top-k ceilings."""
    topk = 3
    inferencer, _ = make_inferencer(topk, crop=(32, 32), stride=(24, 24), window_batch=4)
    mean, std, scale = (127.5,) * 3, (127.5,) * 3, (96, 32)
    config = with_defaults(
        dict(
            model=dict(n_cls=N_CLS, k=topk),
            data=dict(mean=mean, std=std, test_scale=scale, num_workers=0),
            eval=dict(crop=(32, 32), stride=(24, 24), window_batch=4),
        )
    )
    rng = np.random.default_rng(7)
    examples = []
    for h, w in [(40, 60), (64, 48), (50, 50)]:
        image = random_uint8_image(rng, h, w)
        label = rng.integers(0, N_CLS, (h, w)).astype(np.int32)
        label[rng.random((h, w)) < 0.2] = 255
        examples.append((image, label))
    res = evaluation.run_evaluation(
        inferencer, config, evaluation.ArraySource(examples), progress=False
    )
    meter, recall = metrics.MeanIoU(N_CLS), metrics.TopkRecall()
    for image, label in examples:
        passes = ev.image_passes(image, mean=mean, std=std, test_scale=scale)
        got = inferencer.predict_passes(passes, label.shape)
        counts = metrics.counts_numpy(got.pred, label, N_CLS)
        meter.update(counts)
        recall.update(got.selected, counts[metrics.LABEL])
    ref = meter.result()
    assert res["num_images"] == 3
    assert res["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-12)
    assert res["aAcc"] == pytest.approx(ref["aAcc"], abs=1e-12)
    np.testing.assert_allclose(res["IoU"], ref["IoU"], atol=1e-12, equal_nan=True)
    assert res["topk"] == pytest.approx(recall.result())
    assert 0 < res["topk"]["pixel_recall"] < 1
    assert res["windows"] > 3 and res["windows_per_s"] > 0 and res["compilations"] >= 0


def test_clear_errors():
    inferencer, _ = make_inferencer(0)
    image = np.zeros((20, 20, 3), np.float32)
    with pytest.raises(InputError, match="label must be an integer array of shape"):
        inferencer.make_job([(image, False)], (20, 20), label=np.zeros((5, 5), np.int32))
    with pytest.raises(InputError, match="normalised float32"):
        inferencer.make_job([(image.astype(np.float64), False)], (20, 20))
    with pytest.raises(InputError, match="mode must be"):
        ev.InferenceConfig(mode="sliding")
    bad = ev.Inferencer(lambda p, x: x, None, N_CLS, ev.InferenceConfig(crop=(16, 16)))
    with pytest.raises(InputError, match=r"expected \(1, 16, 16, 7\)|expected"):
        bad.predict(np.zeros((16, 16, 3), np.float32))


@pytest.mark.parametrize("model", ["rankseg", "baseline"])
def test_official_slide_outputs_from_recorded_window_logits(official, model):
    """The fixture's x64 images are one 64x64 window each, so their recorded `seg_logits` are
    exactly what encode_decode returns for those windows; a lookup model that replays them must
    reproduce `slide_probs` (within 1e-5) and `slide_pred` (exactly) through the whole path."""
    images = np.load(official / "x64.npy").transpose(0, 2, 3, 1)  # (2, 64, 64, 3)
    ref = np.load(official / f"{model}_fwd_x64.npz")
    recorded = ref["seg_logits"].transpose(0, 2, 3, 1)  # (2, 64, 64, 150)

    def replay(params, windows):
        stored, logits = params
        match = jax.numpy.all(windows[:, None] == stored[None], axis=(2, 3, 4))  # (N, 2)
        return jax.numpy.einsum("ni,ihwc->nhwc", match.astype(np.float32), logits)

    config = ev.InferenceConfig(crop=(64, 64), stride=(64, 64), window_batch=2, tile=(32, 64))
    if model == "rankseg":
        config = ev.InferenceConfig(**{**config.__dict__, "rankseg_fill": -100.0})
    inferencer = ev.Inferencer(replay, (images, recorded), 150, config)
    jobs = [inferencer.make_job([(img, False)], (64, 64), want_probs=True, tag=i)
            for i, img in enumerate(images)]  # fmt: skip
    for done in inferencer.run(jobs):
        probs = ref["slide_probs"][done.tag].transpose(1, 2, 0)
        np.testing.assert_allclose(done.probs, probs, atol=1e-5)
        np.testing.assert_array_equal(done.pred, ref["slide_pred"][done.tag])
        if model == "rankseg":
            assert done.selected.sum() == 50  # one window: exactly its top-50


def test_settings_from_config():
    common = pytest.importorskip("rankseg_jax.config")
    config = common.with_defaults({"eval": {"scales": (0.5, 1.0), "flip": True}})
    inference, kwargs = ev.settings_from_config(config)
    assert inference.crop == (512, 512) and inference.rankseg_fill == -100.0
    assert kwargs["ratios"] == (0.5, 1.0) and kwargs["flip"] and kwargs["test_scale"] == (2048, 512)
