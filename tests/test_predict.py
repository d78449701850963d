"""`--mode=predict` on generated images: files, label values, JSON consistency, bad inputs."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rankseg_jax import inference, predict, visualize
from rankseg_jax.config import load_config
from rankseg_jax.convert import mmseg
from rankseg_jax.convert.safetensors_io import save_safetensors
from rankseg_jax.data import synthetic
from rankseg_jax.errors import InputError, UserError
from rankseg_jax.models.segmenter import Segmenter
from rankseg_jax.modes import predict as predict_mode
from rankseg_jax.segmentor import Segmentor

GOOD = ("ADE_val_00000001", "ADE_val_00000002", "photo")
MIN_COLOURS = 20  # a picture with fewer distinct colours is blank or broken


def tiny_config(**predict_keys):
    """The demo config with a smaller ViT (fast compile) and the given predict.* keys."""
    config = load_config("configs/demo.py")
    with config.unlocked():
        config.model.update(width=64, depth=2, num_heads=2, mlp_dim=128, dec_heads=2)
        config.predict.update(predict_keys)
    return config


def run_mode(config, workdir) -> tuple[int, str, str]:
    """The predict mode with its stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = predict_mode.run(config, str(workdir))
    return code, out.getvalue(), err.getvalue()


def write_inputs(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    """Two generated JPEGs, one PNG, a truncated JPEG and a text file; returns good sizes."""
    folder.mkdir(parents=True)
    sizes = {}
    for i, name in enumerate(GOOD):
        image, _ = synthetic.make_example(7, 1, i, 112, 176)
        suffix = ".png" if name == "photo" else ".jpg"
        assert cv2.imwrite(str(folder / f"{name}{suffix}"), image[..., ::-1])
        sizes[name] = image.shape[:2]
    data = (folder / "ADE_val_00000001.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not an image")
    return sizes


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> pathlib.Path:
    """The tiny model's seeded init exported as .safetensors (an `init_from` file)."""
    seg = Segmentor.from_config(tiny_config())
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_safetensors(mmseg.params_to_state_dict(seg.params), path)
    return path


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, weights):
    root = tmp_path_factory.mktemp("predict")
    sizes = write_inputs(root / "images")
    config = tiny_config(input=str(root / "images"), output=str(root / "out"))
    with config.unlocked():
        config.init_from = str(weights)
    code, stdout, stderr = run_mode(config, root / "workdir")
    return dict(
        code=code, stdout=stdout, stderr=stderr, out=root / "out", sizes=sizes, k=config.model.k
    )


def decode_png(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.asarray(img)


def n_colours(picture: np.ndarray) -> int:
    flat = picture.reshape(-1, picture.shape[-1]) if picture.ndim == 3 else picture.reshape(-1, 1)
    return len(np.unique(flat, axis=0))


def test_good_images_written_and_bad_one_named(folder_run):
    out = folder_run["out"]
    assert folder_run["code"] == 0
    assert "broken.jpg" in folder_run["stderr"]
    assert "wrote 3 of 4 images" in folder_run["stdout"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["written"]) == sorted(GOOD)
    assert [pathlib.Path(p).name for p in summary["failed"]] == ["broken.jpg"]
    assert "truncated" in next(iter(summary["failed"].values()))
    for name in GOOD:
        for sub, suffix in [("labels", "png"), ("color", "png"), ("overlay", "png"),
                            ("json", "json"), ("figures", "png")]:  # fmt: skip
            assert (out / sub / f"{name}.{suffix}").is_file(), (sub, name)
    assert not list(out.glob("*/broken*")) and not list(out.glob("*/notes*"))
    assert (out / "contact_sheet.png").is_file()


def test_label_maps_sizes_and_json(folder_run):
    out, sizes = folder_run["out"], folder_run["sizes"]
    names = visualize.dataset_labels("synthetic_ade20k", 150)[0]
    for name, size in sizes.items():
        labels = decode_png(out / "labels" / f"{name}.png")
        assert labels.dtype == np.uint8 and labels.shape == size
        assert labels.max() < 150
        for sub in ("overlay", "color"):
            assert decode_png(out / sub / f"{name}.png").shape == (*size, 3)
        record = json.loads((out / "json" / f"{name}.json").read_text())
        assert (record["height"], record["width"]) == size
        ids, counts = np.unique(labels, return_counts=True)
        classes = record["classes"]
        assert sorted(c["id"] for c in classes) == ids.tolist()
        by_id = {c["id"]: c for c in classes}
        for cls, count in zip(ids, counts, strict=True):
            assert by_id[cls]["pixels"] == count and by_id[cls]["name"] == names[cls]
            assert by_id[cls]["share"] == pytest.approx(count / labels.size, abs=1e-12)
        assert sum(c["share"] for c in classes) == pytest.approx(1.0, abs=1e-9)
        topk = record["topk"]
        scores = [t["score"] for t in topk]
        assert len(topk) == folder_run["k"] and scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)  # sigmoid scores
        assert all(t["predicted"] == (t["id"] in by_id) for t in topk)
        assert all(t["name"] == names[t["id"]] for t in topk)
        # RankSeg can only output classes that some window selected.
        assert set(by_id) <= set(record["selected"])


def test_every_png_decodes_and_is_a_picture(folder_run):
    out = folder_run["out"]
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 3 * 4 + 1
    for path in pngs:
        picture = decode_png(path)
        assert min(picture.shape[:2]) > 100, path
        if path.parent.name in ("labels", "color"):
            record = json.loads((out / "json" / f"{path.stem}.json").read_text())
            assert n_colours(picture) == len(record["classes"]), path
        else:
            assert n_colours(picture) > MIN_COLOURS, path


def test_colour_png_uses_the_palette(folder_run):
    out = folder_run["out"]
    _, palette = visualize.dataset_labels("synthetic_ade20k", 150)
    labels = decode_png(out / "labels" / "photo.png")
    color = decode_png(out / "color" / "photo.png")
    np.testing.assert_array_equal(color, palette[labels])


def test_input_without_weights_fails_in_one_line(tmp_path):
    image, _ = synthetic.make_example(0, 1, 0, 112, 128)
    assert cv2.imwrite(str(tmp_path / "a.jpg"), image)
    with pytest.raises(UserError) as info:
        run_mode(tiny_config(input=str(tmp_path / "a.jpg")), tmp_path / "wd")
    message = str(info.value)
    assert "\n" not in message and "no checkpoint" in message and "init_from" in message
    assert not (tmp_path / "wd" / "predict").exists()


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec, message in [
        (str(tmp_path / "missing.jpg"), "no such file or folder"),
        (str(tmp_path / "empty"), "no images in folder"),
        (str(tmp_path / "*.jpg"), "no images in glob"),
    ]:
        with pytest.raises(InputError, match=message):
            predict.find_images(spec)
    with pytest.raises(InputError, match="^predict.input: no images"):
        run_mode(tiny_config(input=str(tmp_path / "empty")), tmp_path)


def test_none_readable_exits_1(tmp_path, weights):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    config = tiny_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), figures=False)
    with config.unlocked():
        config.init_from = str(weights)
    code, stdout, stderr = run_mode(config, tmp_path)
    assert code == 1 and "bad.png" in stderr and "wrote 0 of 1" in stdout
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["written"] == {}


def test_demo_without_input_uses_random_init(tmp_path):
    code, stdout, stderr = run_mode(tiny_config(figures=False), tmp_path)
    assert code == 0
    assert "WARNING" in stderr and "random initialisation" in stderr
    out = tmp_path / "predict"
    assert len(list((out / "inputs").glob("*.jpg"))) == predict.DEMO_IMAGES
    assert len(list((out / "overlay").glob("*.png"))) == predict.DEMO_IMAGES
    assert not (out / "figures").exists() and not (out / "contact_sheet.png").exists()
    record = json.loads(next((out / "json").glob("*.json")).read_text())
    assert record["weights"].startswith("(random init")


def test_glob_and_unique_names(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for suffix in (".jpg", ".png"):
            (tmp_path / sub / f"x{suffix}").write_bytes(b"")
    found = predict.find_images(str(tmp_path / "**" / "x.*"))
    assert len(found) == 4
    names = predict.output_names(found)
    assert len(set(names)) == 4 and all(n.startswith(("a__x", "b__x")) for n in names)
    assert predict.output_names([tmp_path / "a" / "x.jpg", tmp_path / "c.png"]) == ["x", "c"]


def test_label_png_format(tmp_path):
    labels = np.array([[0, 149], [3, 7]], np.int32)
    np.testing.assert_array_equal(predict.label_png(labels, 150), labels)
    assert predict.label_png(labels, 150).dtype == np.uint8
    submission = predict.label_png(labels, 150, submission_format=True)
    np.testing.assert_array_equal(submission, labels + 1)
    assert submission.dtype == np.uint8
    wide = predict.label_png(np.array([[0, 846]], np.int32), 847)
    assert wide.dtype == np.uint16
    visualize.write_png(tmp_path / "wide.png", wide)
    np.testing.assert_array_equal(decode_png(tmp_path / "wide.png"), [[0, 846]])


def test_mask_head_scores_are_mean_probabilities():
    """Without an image-level classifier the ranking is the mean pixel probability (sums to 1)."""
    config = load_config("configs/demo.py:head=mask")
    with config.unlocked():
        config.model.update(width=64, depth=2, num_heads=2, mlp_dim=128, dec_heads=2)
    predictor = predict.Predictor(Segmentor.from_config(config))
    image, _ = synthetic.make_example(3, 1, 0, 96, 128)
    pred = predictor(image)
    assert pred.labels.shape == image.shape[:2] and pred.selected is None
    assert pred.scores.shape == (150,) and pred.scores.sum() == pytest.approx(1.0, abs=1e-4)
    assert "probability" in pred.score_kind
    record = predict.prediction_record(predictor, pred, "x.jpg", image.shape[:2])
    assert len(record["topk"]) == predict.JSON_TOPK_NO_RANKSEG and "selected" not in record


def test_predict_runs_the_model_once_per_window(monkeypatch):
    """The label map and the image-level scores share the model calls: every model execution
    is one window batch of the inference, and the windows are exactly the slide windows of the
    image's passes (no second pass over the scale-1.0 windows for the scores)."""
    executed = []
    original = Segmenter.__call__

    def counting(self, images, train=False, gt_labels=None):
        jax.debug.callback(lambda n: executed.append(int(n)), jnp.asarray(images.shape[0]))
        return original(self, images, train, gt_labels)

    monkeypatch.setattr(Segmenter, "__call__", counting)
    config = tiny_config()
    with config.unlocked():
        config.eval.update(scales=(0.75, 1.0), flip=True, window_batch=4)
    predictor = predict.Predictor(Segmentor.from_config(config))
    image, _ = synthetic.make_example(3, 1, 0, 96, 200)
    executed.clear()  # the seeded init ran the model once; count the prediction only
    pred = predictor(image)
    crop, stride = tuple(config.eval.crop), tuple(config.eval.stride)
    windows = sum(
        len(
            inference.slide_windows(
                *p.shape[:2], (min(crop[0], p.shape[0]), min(crop[1], p.shape[1])), stride
            )
        )
        for p, _ in predictor.passes(image)
    )
    assert windows > 4 and pred.windows == windows == predictor.inferencer.windows_run
    assert len(executed) == predictor.inferencer.batches_run
    assert sum(executed) == predictor.inferencer.batches_run * 4  # fixed batches of 4 windows
    assert pred.scores.shape == (150,) and np.all((pred.scores >= 0) & (pred.scores <= 1))
