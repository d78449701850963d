"""Your own data end to end: the folder dataset through the config template, training with
class weights, evaluation with the extended metrics and the confusion matrix, prediction with
the dataset's names and palette (images and video), TFDS preparation, and bad inputs as one
line with exit status 2."""

from __future__ import annotations

import json
import pathlib
import shutil

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rankseg_jax import cli, errors, evaluation, losses, train
from rankseg_jax import config as config_lib
from rankseg_jax.data import class_stats, folder_demo
from rankseg_jax.data import pipeline as pl
from rankseg_jax.data.sources import source_from_config

REPO = pathlib.Path(__file__).resolve().parents[1]
LOSS_CONFIG = dict(
    img_loss="asl", img_loss_weight=10.0, gamma_neg=2.0, gamma_pos=0.0, clip=0.05, eps=1e-5,
    seg_loss_weight=1.0, dice_weight=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    """The generated 7-class folder dataset: palette PNG labels, and val_rgb colour masks."""
    return pathlib.Path(folder_demo.generate_folder(tmp_path_factory.mktemp("own") / "ds", 8, 4))


def custom_config(root: pathlib.Path, extra: str = "") -> config_lib.ml_collections.ConfigDict:
    spec = f"{REPO / 'configs' / 'custom.py'}:root={root},runlocal" + (f",{extra}" if extra else "")
    return config_lib.resolve(spec)


# ---------------------------------------------------------------------------------- config
def test_template_reads_the_class_count_and_picks_k(dataset):
    config = custom_config(dataset)
    assert config.data.dataset == "folder" and config.model.n_cls == 7
    assert config.model.classifier == "rankseg" and config.model.k == 5  # ≤ n_cls, see default_k
    base = custom_config(dataset, "head=mask")
    assert base.model.classifier == "full" and base.model.k == 7
    real = config_lib.resolve(f"{REPO / 'configs' / 'custom.py'}:root={dataset},variant=B/16")
    assert real.model.variant == "B/16" and real.model.n_cls == 7 and real.model.k == 5
    assert real.model.pretrained == "augreg_vit_b16_384"
    with pytest.raises(config_lib.ConfigError, match="k=9"):
        custom_config(dataset, "k=9")


def test_class_weight_setting_is_validated(dataset):
    config = custom_config(dataset)
    with config.unlocked():
        config.loss.class_weight = "1,2,3"
    with pytest.raises(config_lib.ConfigError, match="3 weights for model.n_cls=7"):
        config_lib.validate(config)
    with config.unlocked():
        config.loss.class_weight = "1,1,1,1,1,1,-1"
    with pytest.raises(config_lib.ConfigError, match="loss.class_weight"):
        config_lib.validate(config)
    with config.unlocked():
        config.loss.class_weight = "inverse_freq"
    with pytest.raises(config_lib.ConfigError, match="loss.class_weight"):
        config_lib.validate(config)
    with config.unlocked():
        config.loss.class_weight = "1, 2,3,4,5,6,7"
    assert config_lib.class_weight_setting(config) == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)


# ---------------------------------------------------------------------------------- losses
def _outputs(head: str, rng: np.random.Generator, n_cls: int = 7, k: int = 5):
    b, h, w = 2, 4, 4
    channels = n_cls if head == "mask" else k
    masks = jnp.asarray(rng.normal(size=(b, h, w, channels)), jnp.float32)
    labels = rng.integers(0, n_cls, (b, 8, 8))
    labels[0, :2] = 255
    out = {"masks": masks}
    if head == "rankseg":
        out["topk"] = jnp.asarray(np.stack([rng.permutation(n_cls)[:k] for _ in range(b)]))
        out["img_logits"] = jnp.asarray(rng.normal(size=(b, n_cls)), jnp.float32)
    return out, jnp.asarray(labels, jnp.int32)


class _Frozen(dict):
    """A hashable loss config (a static jit argument)."""

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.items())))


@pytest.mark.parametrize("head", ["mask", "rankseg"])
def test_loss_terms_use_the_class_weights_and_dice(head):
    rng = np.random.default_rng(0)
    outputs, labels = _outputs(head, rng)
    weight = jnp.asarray([0.5, 1.0, 2.0, 0.0, 1.5, 3.0, 1.0], jnp.float32)
    terms = jax.jit(  # compiled: much faster than op-by-op here
        lambda cfg, out, lab, w: losses.loss_terms(out, lab, cfg, 7, class_weight=w),
        static_argnums=0,
    )
    plain = terms(_Frozen(LOSS_CONFIG), outputs, labels, None)
    weighted = terms(_Frozen(LOSS_CONFIG), outputs, labels, weight)
    batch, alone = jax.jit(losses.weighted_seg_loss)(outputs, labels, weight)
    np.testing.assert_allclose(weighted.metrics["decode.loss_seg"], batch, rtol=1e-6)
    np.testing.assert_allclose(weighted.per_image["decode.loss_seg"], alone, rtol=1e-6)
    assert abs(float(weighted.metrics["decode.loss_seg"] - plain.metrics["decode.loss_seg"])) > 1e-3
    with_dice = terms(_Frozen(dict(LOSS_CONFIG, dice_weight=0.4)), outputs, labels, weight)
    logits = losses.upsample_logits(outputs["masks"], labels.shape[1:])
    target = labels
    if head == "rankseg":
        target = losses.relabel_to_slots(labels, outputs["topk"], 255)
    expected = losses.dice_loss(logits, target, 255, loss_weight=0.4)
    np.testing.assert_allclose(with_dice.metrics["decode.loss_dice"], expected, rtol=1e-6)
    np.testing.assert_allclose(
        with_dice.total, weighted.total + expected, rtol=1e-6
    )  # the Dice term enters the total
    assert "decode.loss_dice" not in weighted.metrics


def test_inverse_frequency_weights_resolved_once_then_cached(dataset, monkeypatch):
    config = custom_config(dataset, "class_weight=inverse_frequency")
    source = train.source_from_config(config, "train")
    shutil.rmtree(dataset / class_stats.CACHE_DIRNAME, ignore_errors=True)
    calls = []
    original = class_stats.class_pixel_counts
    monkeypatch.setattr(
        class_stats, "class_pixel_counts", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    first = train.resolve_class_weight(config, source)
    second = train.resolve_class_weight(config, source)
    assert len(first) == 7 and first == second and calls == [1]
    counts = original(source, progress=False)
    np.testing.assert_allclose(first, class_stats.inverse_frequency(counts))
    assert list((dataset / class_stats.CACHE_DIRNAME).glob("class_weights-train-*.json"))
    assert train.resolve_class_weight(custom_config(dataset), source) is None


# ------------------------------------------------------------------------- end to end
def _small(config):
    """The runlocal template shortened further: 3 steps, evaluation on the colour-mask split."""
    with config.unlocked():
        config.total_steps = 3
        config.eval.every_steps = 3
        config.eval.max_images = 2
        config.checkpoint.every_steps = 3
        config.data.val_split = folder_demo.COLOR_SPLIT
    return config


def _write_video(path: pathlib.Path, frames: int, size: tuple[int, int] = (48, 64)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, size[::-1])
    image, _ = folder_demo.make_example(0, 1, 0, 64, 64)
    for i in range(frames):
        writer.write(np.ascontiguousarray(np.roll(image[: size[0], : size[1]], i, 1)[..., ::-1]))
    writer.release()


def tensorboard_tags(path: pathlib.Path) -> set[str]:
    import tensorflow as tf  # optional and heavy: only to read the event file

    tags = set()
    for record in tf.data.TFRecordDataset(str(path)):
        event = tf.compat.v1.Event.FromString(record.numpy())
        tags.update(value.tag for value in event.summary.value)
    return tags


def test_train_eval_predict_with_the_dataset_classes(dataset, tmp_path, capsys):
    """The template trains (class weights from the train labels), evaluates on colour masks
    with the class names in the table, JSON and figures, and predicts images and a video in
    the dataset's palette, all through cli.run_mode (what main.py runs after parsing)."""
    workdir = tmp_path / "work"
    config = _small(custom_config(dataset, "class_weight=inverse_frequency"))
    assert cli.run_mode(config, "train", str(workdir)) == 0
    names = list(folder_demo.CLASS_NAMES)
    results = json.loads(evaluation.results_path(workdir, 3).read_text())
    assert results["class_names"] == names and list(results["per_class"]) == names
    for key in ("mIoU", "mDice", "mFscore", "mPrecision", "mRecall"):
        assert key in results
    assert set(results["per_class"]["sky"]) == {
        "IoU",
        "Acc",
        "Dice",
        "Fscore",
        "Precision",
        "Recall",
    }
    table = evaluation.table_path(workdir, 3).read_text()
    assert all(name in table for name in names) and "mDice" in table and "mFscore" in table
    confusion = np.load(evaluation.confusion_path(workdir, 3))
    assert confusion.dtype == np.int64 and confusion.shape == (7, 7)
    counts = results["counts"]
    np.testing.assert_array_equal(np.diag(confusion), counts["intersection"])
    np.testing.assert_array_equal(confusion.sum(axis=0), counts["prediction"])
    np.testing.assert_array_equal(confusion.sum(axis=1), counts["label"])
    assert confusion.sum() == results["num_pixels"] > 0
    for path in (
        evaluation.confusion_path(workdir, 3, ".png"),
        evaluation.iou_chart_path(workdir, 3),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tags = set().union(*(tensorboard_tags(p) for p in workdir.glob("events.out.tfevents*")))
    assert {"eval/confusion", "eval/iou_per_class", "eval/mDice", "eval/mFscore"} <= tags
    assert list((dataset / class_stats.CACHE_DIRNAME).glob("class_weights-train-*.json"))

    # --mode=eval: the same evaluator on the workdir's checkpoint.
    for path in (workdir / "eval").iterdir():
        path.unlink()
    assert cli.run_mode(config, "eval", str(workdir)) == 0
    again = json.loads(evaluation.results_path(workdir, 3).read_text())
    assert again["counts"] == results["counts"] and evaluation.confusion_path(workdir, 3).exists()

    # --mode=predict on an image and a 6-frame video: names and palette of the dataset.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image, _ = folder_demo.make_example(0, 1, 1, 64, 64)
    cv2.imwrite(str(inputs / "photo.png"), image[..., ::-1])
    _write_video(inputs / "clip.mp4", 6)
    with config.unlocked():
        config.predict.input = str(inputs)
        config.predict.output = str(tmp_path / "out")
        config.predict.figures = False
    assert cli.run_mode(config, "predict", str(workdir)) == 0
    out = tmp_path / "out"
    record = json.loads((out / "json" / "photo.json").read_text())
    assert {c["name"] for c in record["topk"]} <= set(names) and len(record["topk"]) == 5
    color = np.asarray(Image.open(out / "color" / "photo.png").convert("RGB")).reshape(-1, 3)
    palette = {tuple(int(v) for v in row) for row in folder_demo.PALETTE}
    assert {tuple(int(v) for v in c) for c in np.unique(color, axis=0)} <= palette
    lines = (out / "video" / "clip.jsonl").read_text().splitlines()
    assert len(lines) == 6
    frame = json.loads(lines[0])
    assert frame["frame"] == 0 and {c["name"] for c in frame["topk"]} <= set(names)
    capture = cv2.VideoCapture(str(out / "video" / "clip_overlay.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    assert (
        int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
    ) == (48, 64)
    capture.release()

    # A corrupt video: one line naming the file, exit status 2, before any model work.
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with config.unlocked():
        config.predict.input = str(bad)
    capsys.readouterr()
    assert cli.run_mode(config, "predict", str(workdir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]


def _mutated(dataset: pathlib.Path, tmp_path: pathlib.Path, how: str) -> pathlib.Path:
    root = tmp_path / how
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns(class_stats.CACHE_DIRNAME))
    train_label = root / "annotations" / "train" / "train_00001.png"
    if how == "unknown_colour":
        path = root / "annotations" / "val_rgb" / "val_00000.png"
        mask = np.asarray(Image.open(path).convert("RGB")).copy()
        mask[2, 3] = (1, 2, 3)
        Image.fromarray(mask).save(path)
    elif how == "label_beyond_classes":
        label = np.asarray(Image.open(train_label)).copy()
        label[0, 0] = 9
        Image.fromarray(label, mode="L").save(train_label)
    elif how == "missing_classes_file":
        (root / "classes.json").unlink()
    elif how == "image_without_label":
        train_label.unlink()
    elif how == "size_mismatch":
        label = np.asarray(Image.open(train_label))
        Image.fromarray(np.ascontiguousarray(label[:-2]), mode="L").save(train_label)
    return root


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("unknown_colour", "val_00000.png: colour (1, 2, 3)"),
        ("label_beyond_classes", "train_00001.png: label values outside"),
        ("missing_classes_file", "no classes.txt or classes.json"),
        ("image_without_label", "train_00001.jpg: image without label"),
        ("size_mismatch", "train_00001.png: label size"),
    ],
)
def test_bad_inputs_are_one_line_exit_2(dataset, tmp_path, capsys, how, expected):
    """Each bad input stops `--mode=train` before anything compiles: one line, status 2."""
    root = _mutated(dataset, tmp_path, how)
    try:
        config = _small(custom_config(root))
    except errors.UserError as exc:  # the template reads the classes: same one line
        assert how == "missing_classes_file" and expected in str(exc)
        config = _small(custom_config(dataset))
        with config.unlocked():
            config.data.root = str(root)
    if how == "unknown_colour":  # evaluation data are checked before training too
        with config.unlocked():
            config.eval.every_steps = 1
    capsys.readouterr()
    assert cli.run_mode(config, "train", str(tmp_path / "w")) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress bars, then the error
    errors_said = [line for line in err if "error" in line.lower()]
    assert errors_said == [err[-1]] and err[-1].startswith("error: ") and expected in err[-1]


def test_prepared_folder_dataset_gives_identical_batches(dataset, tmp_path):
    """data/prepare_tfds.py --dataset=folder: every split (the colour-mask one included) as
    array_record with its classes; examples and train/eval batches equal the directory's."""
    pytest.importorskip("tensorflow_datasets")
    from rankseg_jax.data.tfds_builders import builders  # needs tensorflow_datasets

    data_dir = str(tmp_path / "tfds")
    assert builders.main(["--dataset=folder", f"--root={dataset}", f"--data_dir={data_dir}"]) == 0
    config = custom_config(dataset)
    tfds_config = custom_config(dataset)
    with tfds_config.unlocked():
        tfds_config.data.source = "tfds"
        tfds_config.data.tfds_data_dir = data_dir
    for split in ("train", "val", folder_demo.COLOR_SPLIT):
        directory = source_from_config(config, split)
        prepared = source_from_config(tfds_config, split)
        assert len(prepared) == len(directory) and prepared.class_names == directory.class_names
        np.testing.assert_array_equal(prepared.palette, directory.palette)
        for i in range(len(directory)):
            a, b = prepared[i], directory[i]
            assert a["name"] == b["name"]
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    cfg = pl.PipelineConfig.from_config(config)
    expected = list(pl.TrainIterator(source_from_config(config, "train"), cfg, num_steps=2,
                                     process_index=0, process_count=1))  # fmt: skip
    got = list(pl.TrainIterator(source_from_config(tfds_config, "train"), cfg, num_steps=2,
                                process_index=0, process_count=1))  # fmt: skip
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected, strict=True):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
