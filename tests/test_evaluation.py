"""`--mode=eval` end to end, and the evaluation pieces it adds (GT-oracle windows, large images).

The end-to-end tests run a tiny RankSeg model (width 32, one encoder layer) on three generated
ADE20K-format validation images. Metric checks are exact (integer pixel counts, mIoU to 1e-12);
the torch comparisons use 1e-5 absolute on probabilities and exact argmax.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax import checkpoint, evaluation, metrics
from rankseg_jax import config as configuration
from rankseg_jax import inference as ev
from rankseg_jax.convert import mmseg, safetensors_io
from rankseg_jax.convert.loading import expected_params
from rankseg_jax.data import sources
from rankseg_jax.errors import DatasetError, DatasetNotFoundError, InputError
from rankseg_jax.models.segmenter import create_model
from rankseg_jax.modes import evaluate as evaluate_mode
from rankseg_jax.segmentor import Segmentor, init_params
from rankseg_testing import toy_segmenter as toy

REPO = pathlib.Path(__file__).resolve().parents[1]
N_VAL = 3


def tiny_config(root: pathlib.Path, init_from: str = ""):
    """configs/demo.py:runlocal with a smaller model, no workers and a 3-image val split."""
    config = configuration.load_config("configs/demo.py:runlocal")
    config.model.update(width=32, depth=1, num_heads=2, mlp_dim=64, dec_heads=2)
    config.data.update(
        root=str(root / "ADEChallengeData2016"), synthetic_train=0, synthetic_val=N_VAL,
        num_workers=0,
    )  # fmt: skip
    config.init_from = init_from
    return config


def random_params(config, seed: int):
    """Seeded random params with the bias terms perturbed, so predictions vary across classes."""
    model = create_model(config.model)
    params = init_params(model, config)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    noisy = [np.asarray(x) + rng.normal(0, 0.2, np.shape(x)).astype(np.float32) for x in leaves]
    return model, jax.tree.unflatten(tree, noisy)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config, weights file, params): the generated dataset and an init_from .safetensors."""
    tmp = tmp_path_factory.mktemp("eval_mode")
    config = tiny_config(tmp / "data")
    _, params = random_params(config, seed=1)
    weights = tmp / "weights.safetensors"
    safetensors_io.save_safetensors(dict(mmseg.params_to_state_dict(params)), weights)
    config.init_from = str(weights)
    return config, weights, params


def numpy_counts(segmentor: Segmentor, source) -> np.ndarray:
    """Segmentor.predict per raw image, then the mmseg histograms in numpy: (3, n_cls) int64."""
    total = np.zeros((3, source.n_cls), np.int64)
    for index in range(len(source)):
        example = source[index]
        pred = segmentor.predict(example["image"])
        total += metrics.counts_numpy(pred, example["label"], source.n_cls, source.ignore_index)
    return total


def test_eval_command_writes_results_equal_to_numpy(setup, tmp_path, capsys):
    """`modes.evaluate.run` with init_from: the JSON's counts and mIoU equal a numpy
    computation from Segmentor.predict; NaN classes are null; the table is printed and written;
    TensorBoard gets the scalars."""
    config, weights, params = setup
    workdir = tmp_path / "run"
    assert evaluate_mode.run(config, str(workdir)) == 0
    printed = capsys.readouterr().out
    results = json.loads(evaluation.results_path(workdir, 0).read_text())
    table = evaluation.table_path(workdir, 0).read_text()

    source = sources.source_from_config(config, "val")
    counts = numpy_counts(Segmentor(config, create_model(config.model), params), source)
    got = np.array([results["counts"][k] for k in ("intersection", "prediction", "label")])
    np.testing.assert_array_equal(got, counts)
    want = metrics.scores_from_counts(counts)
    assert counts[metrics.PRED].sum() == counts[metrics.LABEL].sum() > 0
    assert results["mIoU"] == pytest.approx(want["mIoU"], abs=1e-12)
    assert results["aAcc"] == pytest.approx(want["aAcc"], abs=1e-12)
    iou = [math.nan if v is None else v for v in results["IoU"]]
    np.testing.assert_allclose(iou, want["IoU"], atol=1e-12, equal_nan=True)
    assert None in results["IoU"]  # absent classes are written as null
    assert results["class_names"] == list(source.class_names)
    assert results["num_images"] == N_VAL and results["weights"] == str(weights)
    assert results["topk"]["num_images"] == N_VAL and results["windows"] >= N_VAL

    assert "Class" in printed and "mIoU" in printed and "top-k ceilings" in printed
    assert source.class_names[0] in table and table.strip() in printed
    events = list(workdir.glob("events.out.tfevents*"))
    assert events, "no TensorBoard event file"
    tags = tensorboard_tags(events[0])
    assert {"eval/mIoU", "eval/aAcc", "eval/pixel_recall", "eval/windows_per_s"} <= tags
    scored = [i for i, v in enumerate(results["IoU"]) if v is not None]
    assert f"eval/IoU/{scored[0]:03d}_{evaluation._tag(source.class_names[scored[0]])}" in tags
    assert len([t for t in tags if t.startswith("eval/IoU/")]) == len(scored)


def tensorboard_tags(path: pathlib.Path) -> set[str]:
    import tensorflow as tf

    tags = set()
    for record in tf.data.TFRecordDataset(str(path)):
        event = tf.compat.v1.Event.FromString(record.numpy())
        tags.update(value.tag for value in event.summary.value)
    return tags


def test_workdir_checkpoint_wins_over_init_from(setup, tmp_path):
    """With an orbax checkpoint in the workdir, eval uses it (not init_from) and names the step."""
    config, _, _ = setup
    model, params = random_params(config, seed=2)
    workdir = tmp_path / "trained"
    manager = checkpoint.make_manager(workdir, config)
    checkpoint.save(manager, 7, params, {"step": np.int32(7)}, {"position": 0})
    manager.wait_until_finished()
    manager.close()
    assert evaluate_mode.run(config, str(workdir)) == 0
    results = json.loads(evaluation.results_path(workdir, 7).read_text())
    assert results["step"] == 7 and "checkpoints/7" in results["weights"]
    source = sources.source_from_config(config, "val")
    counts = numpy_counts(Segmentor(config, model, params), source)
    np.testing.assert_array_equal(results["counts"]["prediction"], counts[metrics.PRED])


def test_gt_oracle_evaluation_selects_the_label_classes(setup):
    """run_evaluation with the GT-oracle head: every window gets its image's class set from the
    label, so the top-k ceilings are exactly 1; counts equal Segmentor.predict(image, label)."""
    config = setup[0].copy_and_resolve_references()
    config.model.update(classifier="gt", k=150, dec_layers=2)
    config.init_from = ""
    segmentor = Segmentor.from_config(config)
    source = sources.source_from_config(config, "val")
    results = evaluation.run_evaluation(segmentor, config, source, progress=False)
    assert results["topk"]["pixel_recall"] == 1.0 and results["topk"]["image_recall"] == 1.0
    total = np.zeros((3, source.n_cls), np.int64)
    for index in range(len(source)):
        example = source[index]
        pred = segmentor.predict(example["image"], gt_label=example["label"])
        assert set(np.unique(pred)) <= set(np.unique(example["label"]))
        total += metrics.counts_numpy(pred, example["label"], source.n_cls)
    got = np.array([results["counts"][k] for k in ("intersection", "prediction", "label")])
    np.testing.assert_array_equal(got, total)


def test_missing_dataset_is_one_line_and_exit_2(tmp_path):
    """main.py --mode=eval on a missing dataset: exit code 2, one error line, no traceback."""
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [
            sys.executable, "main.py", "--config=configs/demo.py:runlocal",
            f"--workdir={tmp_path / 'wd'}", "--mode=eval",
            "--config.data.generate_if_missing=False", f"--config.data.root={missing}",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_source_from_config_errors(tmp_path):
    config = tiny_config(tmp_path / "data")
    config.data.generate_if_missing = False
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        sources.source_from_config(config, "val")
    config.data.update(generate_if_missing=True, dataset="ade20k")
    with pytest.raises(DatasetError, match="generate_if_missing works only"):
        sources.source_from_config(config, "val")


def test_gt_head_slide_matches_torch_reference(torch):
    """GT oracle in slide inference: every window gets its whole image's class set (as a
    (1, n_cls) carrier), also when windows of two images share one model batch; probabilities
    match torch `Segmenter.slide_inference(..., targets=label)` within 1e-5."""
    tr = pytest.importorskip("rankseg_testing.torch_reference")
    n_cls, crop, stride = 12, (32, 32), (24, 24)
    config = configuration.load_config("configs/ade20k_segmenter.py:head=gt")
    config.model.update(
        variant="custom", width=32, depth=1, num_heads=2, mlp_dim=128, dec_heads=2,
        img_size=(32, 32), n_cls=n_cls, k=n_cls,
    )  # fmt: skip
    ref = tr.build_segmenter(
        tr.SegmenterConfig(
            head="gt", img_size=(32, 32), embed_dims=32, num_layers=1, num_heads=2,
            n_cls=n_cls, d_model=32, head_layers=config.model.dec_layers, head_heads=2,
            d_ff=128, topk_cls=n_cls,
        )
    )  # fmt: skip
    ref = tr.randomize_parameters_(ref, 4).eval()
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = create_model(config.model)
    params = mmseg.state_dict_to_params(state, expected_params(model, config), gt_head=True)
    settings = ev.InferenceConfig(crop=crop, stride=stride, window_batch=4, rankseg_fill=-100.0)
    forward = partial(model.apply, method=model.encode_decode)
    inferencer = ev.Inferencer(
        lambda p, images, gt: forward({"params": p}, images, gt),
        params,
        n_cls,
        settings,
        label_context=partial(ev.gt_class_set, n_cls=n_cls),
    )
    rng = np.random.default_rng(5)
    cases = []
    for (h, w), classes in [((40, 56), [1, 4, 9]), ((32, 50), [0, 2, 4, 7, 11])]:
        image = rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)
        label = rng.choice(classes + [255], size=(h + 7, w - 5)).astype(np.int32)
        cases.append((image, label))
    jobs = [
        inferencer.make_job([(img, False)], lab.shape, label=lab, want_probs=True, tag=i)
        for i, (img, lab) in enumerate(cases)
    ]
    done = {d.tag: d for d in inferencer.run(jobs)}
    for i, (image, label) in enumerate(cases):
        x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
        targets = torch.from_numpy(label.astype(np.int64))[None]
        with torch.no_grad():
            want = ref.slide_inference(x, crop, stride, label.shape, targets=targets)
        want = want[0].numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(done[i].probs, want, atol=1e-5)
        np.testing.assert_array_equal(done[i].pred, want.argmax(-1))
        present = np.unique(label[label < n_cls])
        np.testing.assert_array_equal(np.flatnonzero(done[i].selected), present)
    with pytest.raises(InputError, match="GT-oracle"):
        inferencer.make_job([(cases[0][0], False)], (40, 56))


def _nearest_reference(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """mmcv.imrescale(label, scale, 'nearest') from its spec: destination pixel (y, x) reads
    source (floor(y * H0 / h), floor(x * W0 / w)) (cv2 INTER_NEAREST), written with numpy."""
    h, w = size
    rows = np.minimum(np.floor(np.arange(h) * label.shape[0] / h).astype(int), label.shape[0] - 1)
    cols = np.minimum(np.floor(np.arange(w) * label.shape[1] / w).astype(int), label.shape[1] - 1)
    return label[rows][:, cols]


def test_gt_class_set_comes_from_the_label_after_the_test_resize_and_flip():
    """As the official `_gt` test pipeline feeds the GT-oracle head: per (scale, flip) pass the
    class set of the label resized (nearest) to that pass's image and flipped with it. A one-
    pixel class at an odd (row, col) vanishes at ratio 0.5 and is present at ratio 1.0; the
    averaged probabilities of a model that spreads each window uniformly over its context's
    classes equal the mean over passes of the reference class sets."""
    n_cls = 9
    label = np.full((40, 60), 3, np.int32)
    label[10:30, 20:50] = 7
    label[1, 1] = 5  # one pixel: nearest downscaling by 2 reads only even rows/columns
    label[39, 0] = 255  # ignored pixels are in no class set
    image = np.random.default_rng(0).uniform(-1, 1, (40, 60, 3)).astype(np.float32)
    ratios, test_scale = (0.5, 1.0), (60, 40)
    passes = ev.image_passes(
        image, mean=(0.0,) * 3, std=(1.0,) * 3, test_scale=test_scale, ratios=ratios, flip=True
    )
    assert [p[0].shape[:2] for p in passes] == [(20, 30)] * 2 + [(40, 60)] * 2

    def spread_over_context(params, windows, context):
        present = (context[:, 0, :] == jnp.arange(n_cls)).astype(jnp.float32)  # (N, C)
        logits = jnp.where(present > 0, 0.0, -1e4)[:, None, None, :]
        return jnp.broadcast_to(logits, (*windows.shape[:3], n_cls))

    settings = ev.InferenceConfig(crop=(20, 20), stride=(20, 20), window_batch=4)
    inferencer = ev.Inferencer(
        spread_over_context, {}, n_cls, settings,
        label_context=partial(ev.gt_class_set, n_cls=n_cls),
    )  # fmt: skip
    job = inferencer.make_job(passes, label.shape, label=label, want_probs=True)
    want = np.zeros(n_cls)
    for p, (img, flipped) in zip(job.passes, passes, strict=True):
        seen = _nearest_reference(label, img.shape[:2])
        seen = seen[:, ::-1] if flipped else seen
        classes = np.unique(seen[seen < n_cls])
        np.testing.assert_array_equal(p.context, ev.gt_class_set(seen, n_cls))
        np.testing.assert_array_equal(np.flatnonzero(p.context[0] < n_cls), classes)
        want[classes] += 1.0 / len(classes) / len(passes)
    small, full = job.passes[0].context[0], job.passes[2].context[0]
    assert small[5] == n_cls and full[5] == 5  # the tiny class: gone after the 0.5 resize
    (done,) = list(inferencer.run([job]))
    np.testing.assert_allclose(done.probs, np.broadcast_to(want, done.probs.shape), atol=1e-6)


def test_large_output_is_resized_in_bounded_tiles(torch):
    """A 2000x3000 original from a 128x192 test-scale image: the resize back runs in tiles of
    the configured shape only (bounded device memory; one compilation for any output size),
    and matches torch bilinear + softmax on sampled rows within 1e-5 (argmax exact)."""
    n_cls, tile = 3, (256, 512)
    params = toy.toy_params(n_cls, seed=8)
    config = ev.InferenceConfig(crop=(64, 64), stride=(48, 48), window_batch=4, tile=tile)
    inferencer = ev.Inferencer(partial(toy.jax_encode_decode, topk=0), params, n_cls, config)
    shapes = []
    finish = inferencer._finish

    def recording_finish(*args, **kwargs):
        out = finish(*args, **kwargs)
        shapes.append(out[1].shape if out[1] is not None else out[0].shape + (n_cls,))
        return out

    inferencer._finish = recording_finish
    image = np.random.default_rng(9).uniform(-1, 1, (128, 192, 3)).astype(np.float32)
    out_size = (2000, 3000)
    with ev.count_compilations() as compiled:
        got = inferencer.predict(image, out_size, return_probs=True)
    n_tiles = math.ceil(2000 / tile[0]) * math.ceil(3000 / tile[1])
    assert shapes == [(*tile, n_cls)] * n_tiles
    assert compiled.count("jit(_finish_tile)") == 1
    with ev.count_compilations() as again:
        inferencer.predict(image, (1500, 2900), return_probs=True)
    assert "jit(_finish_tile)" not in again

    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]
    model = lambda t: toy.torch_encode_decode(params, t, topk=0)
    want = toy.torch_inference(model, x, out_size, config.crop, config.stride, n_cls)[0]
    rows = [0, 1, 255, 256, 1000, 1999]
    want_rows = want[:, rows].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(got.probs[rows], want_rows, atol=1e-5)
    np.testing.assert_array_equal(got.pred[rows], want_rows.argmax(-1))


def test_process_sums_and_topk_merge(monkeypatch):
    """The multi-process path: 64-bit sums sent as uint32 words (faked two-process gather of
    identical halves doubles every value exactly, beyond 2^32), and the top-k sums give back
    TopkRecall.result()."""
    from jax.experimental import multihost_utils

    recall = metrics.TopkRecall()
    recall.update(np.array([1, 1, 0, 0], bool), np.array([5, 0, 3, 0]))
    recall.update(np.array([0, 1, 1, 0], bool), np.array([0, 2, 2, 6]))
    recall.update(np.array([1, 0, 0, 0], bool), np.zeros(4, np.int64))
    merged = evaluation._topk_from_sums(evaluation._topk_sums(recall))
    assert merged == pytest.approx(recall.result())

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, x]))
    big = np.array([[3, 2**40 + 5], [0, 2**33]], np.int64)
    np.testing.assert_array_equal(evaluation.sum_over_processes(big), 2 * big)
    floats = np.array([0.1, 1e300, -2.5])
    np.testing.assert_array_equal(evaluation.sum_over_processes(floats), 2 * floats)


def test_scalars_skip_nan_and_name_classes():
    results = {
        "mIoU": 0.5, "aAcc": 0.75, "mAcc": math.nan, "IoU": [0.25, math.nan],
        "class_names": ["chest of drawers, chest", "sky"], "eval_time_s": 2.0,
        "windows_per_s": 10.0, "images_per_s": 1.0,
        "topk": {"pixel_recall": 0.9, "image_recall": 0.8, "mean_selected": 5.0},
    }  # fmt: skip
    out = evaluation.scalars(results)
    assert out["eval/mIoU"] == 50.0 and out["eval/pixel_recall"] == 90.0
    assert out["eval/IoU/000_chest_of_drawers_chest"] == 25.0
    assert "eval/mAcc" not in out and not any(k.startswith("eval/IoU/001") for k in out)
