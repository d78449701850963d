"""The folder reader: a generated 7-class dataset with palette PNGs, colour masks, split lists,
and every bad input as one line naming the file."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from rankseg_jax.data import base, folder, readers

NAMES = ("road", "sky", "tree", "car", "person", "building", "water")
PALETTE = np.array(
    [[128, 64, 128], [70, 130, 180], [107, 142, 35], [0, 0, 142], [220, 20, 60],
     [70, 70, 70], [0, 80, 255]], np.uint8,
)  # fmt: skip
IGNORE_COLOR = (255, 255, 255)


def _example(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    label = rng.integers(0, len(NAMES), (h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)
    label = label[:h, :w].astype(np.uint8)
    label[rng.random((h, w)) < 0.05] = 255
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image, label


def _palette_png(path: pathlib.Path, label: np.ndarray) -> None:
    img = Image.fromarray(label, mode="P")
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(PALETTE)] = PALETTE
    img.putpalette(flat.ravel().tolist())
    img.save(path)


def make_dataset(root: pathlib.Path, classes: str = "json") -> dict[str, dict[str, np.ndarray]]:
    """train: 4 JPEG-free PNG images with palette-mode labels; val: 3 with palette labels;
    val_rgb: the val images with colour-coded RGB masks. Returns {split: {stem: label}}."""
    rng = np.random.default_rng(0)
    truth: dict[str, dict[str, np.ndarray]] = {}
    for split, count in (("train", 4), ("val", 3)):
        truth[split] = {}
        for split_dir in [split] + (["val_rgb"] if split == "val" else []):
            (root / "images" / split_dir).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split_dir).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = _example(rng, 40 + 8 * i, 56)
            stem = f"{split}_{i:03d}"
            Image.fromarray(image).save(root / "images" / split / f"{stem}.png")
            _palette_png(root / "annotations" / split / f"{stem}.png", label)
            truth[split][stem] = label.astype(np.int32)
            if split == "val":
                Image.fromarray(image).save(root / "images" / "val_rgb" / f"{stem}.png")
                color = np.zeros((*label.shape, 3), np.uint8)
                color[label == 255] = IGNORE_COLOR
                color[label != 255] = PALETTE[label[label != 255]]
                Image.fromarray(color).save(root / "annotations" / "val_rgb" / f"{stem}.png")
    truth["val_rgb"] = truth["val"]
    if classes == "json":
        spec = {"classes": list(NAMES), "palette": PALETTE.tolist(),
                "ignore_color": list(IGNORE_COLOR)}  # fmt: skip
        (root / "classes.json").write_text(json.dumps(spec))
    else:
        (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return truth


@pytest.fixture()
def dataset(tmp_path):
    return tmp_path, make_dataset(tmp_path)


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    assert isinstance(err.value, base.DatasetError)
    for part in parts:
        assert part in message, (part, message)
    return message


@pytest.mark.parametrize("split", ["train", "val", "val_rgb"])
def test_reads_palette_and_color_labels(dataset, split):
    root, truth = dataset
    source = folder.FolderSource(root, split)
    source.check_layout()
    assert source.n_cls == 7 and source.class_names == NAMES
    np.testing.assert_array_equal(source.palette, PALETTE)
    assert source.stems == sorted(truth[split]) and len(source) == len(truth[split])
    for i, stem in enumerate(source.stems):
        example = source[i]
        assert example["name"] == stem and example["image"].dtype == np.uint8
        assert example["label"].dtype == np.int32
        np.testing.assert_array_equal(example["label"], truth[split][stem])
        np.testing.assert_array_equal(source.load_label(i), truth[split][stem])


def test_classes_txt_config_classes_and_registration(tmp_path, monkeypatch):
    truth = make_dataset(tmp_path, classes="txt")
    source = folder.FolderSource(tmp_path, "val")
    assert source.class_names == NAMES and not source.has_palette and source.palette.shape == (7, 3)
    assert len(set(map(tuple, source.palette.tolist()))) == 7  # a generated, distinct palette
    np.testing.assert_array_equal(source[1]["label"], truth["val"]["val_001"])
    renamed = [f"c{i}" for i in range(7)]
    given = folder.FolderSource(tmp_path, "val", classes=renamed, palette=PALETTE)
    assert given.class_names == tuple(renamed) and given.has_palette
    np.testing.assert_array_equal(given[0]["label"], truth["val"]["val_000"])
    # Registering the reader is one line; make_source passes the config's options through.
    monkeypatch.setitem(readers.READERS, "folder", folder.FolderSource)
    made = readers.make_source("folder", tmp_path, "train", classes=renamed, palette=PALETTE)
    assert isinstance(made, folder.FolderSource) and len(made) == 4


def test_split_list_reduce_zero_label_and_ignore_index(tmp_path):
    make_dataset(tmp_path, classes="txt")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "mine.txt").write_text("val/val_002.png\ntrain/train_001\n")
    source = folder.FolderSource(tmp_path, "mine", split_list="splits/mine.txt")
    source.check_layout()
    assert source.stems == ["val/val_002", "train/train_001"]
    assert source[1]["name"] == "train/train_001"
    # reduce_zero_label: file value 0 -> ignore, k -> k - 1; the classes file lists values 1..n.
    root = tmp_path / "z"
    (root / "images" / "train").mkdir(parents=True)
    (root / "annotations" / "train").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "train" / "a.jpg")
    raw = np.array([[0, 1, 2, 3]] * 8, np.uint8).repeat(2, 1)
    Image.fromarray(raw, mode="L").save(root / "annotations" / "train" / "a.png")
    (root / "classes.txt").write_text("x\ny\nz\n")
    got = folder.FolderSource(root, "train", reduce_zero_label=True, ignore_index=99)[0]["label"]
    np.testing.assert_array_equal(got[0], [99, 99, 0, 0, 1, 1, 2, 2])
    with pytest.raises(base.DatasetError) as err:
        folder.FolderSource(root, "train", ignore_index=99)[0]  # 3 is no class without reduction
    _one_line(err, "a.png", "3", "99 = ignore")


def _bad(root: pathlib.Path, split: str = "val", **opts):
    source = folder.FolderSource(root, split, **opts)
    source.check_layout()
    return [source[i] for i in range(len(source))]


def test_unknown_colour_names_file_and_colour(dataset):
    root, _ = dataset
    path = root / "annotations" / "val_rgb" / "val_001.png"
    color = np.array(Image.open(path))
    color[3, 5] = (1, 2, 3)
    Image.fromarray(color).save(path)
    with pytest.raises(folder.DatasetError) as err:
        _bad(root, "val_rgb")
    _one_line(err, str(path), "(1, 2, 3)", "row 3, col 5")


def test_label_value_beyond_classes(dataset):
    root, truth = dataset
    path = root / "annotations" / "val" / "val_000.png"
    label = truth["val"]["val_000"].astype(np.uint8)
    label[0, 0] = 7
    _palette_png(path, label)
    with pytest.raises(base.DatasetError) as err:
        _bad(root)
    _one_line(err, str(path), "7", "0..6")


def test_missing_classes_file(dataset):
    root, _ = dataset
    (root / "classes.json").unlink()
    with pytest.raises(folder.DatasetError) as err:
        _bad(root)
    _one_line(err, str(root), "classes.txt", "data.classes")


def test_image_without_label(dataset):
    root, _ = dataset
    (root / "annotations" / "val" / "val_002.png").unlink()
    with pytest.raises(base.DatasetNotFoundError) as err:
        _bad(root)
    _one_line(err, str(root / "images" / "val" / "val_002.png"), "without label", "1 of 3")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "annotations" / "val" / "val_002.jpg")
    with pytest.raises(base.DatasetNotFoundError) as err:
        _bad(root)
    _one_line(err, "val_002.jpg", "lossless")


def test_size_mismatch(dataset):
    root, truth = dataset
    path = root / "annotations" / "val" / "val_001.png"
    _palette_png(path, truth["val"]["val_001"][:-4].astype(np.uint8))
    with pytest.raises(base.DatasetError) as err:
        _bad(root)
    _one_line(err, str(path), "differs from image size")


def test_layout_and_classes_checks(dataset):
    root, _ = dataset
    with pytest.raises(base.DatasetNotFoundError) as err:
        folder.FolderSource(root, "test")
    _one_line(err, str(root / "images" / "test"))
    with pytest.raises(base.DatasetNotFoundError) as err:
        folder.FolderSource(root / "nowhere", "val")
    _one_line(err, "data.root")
    with pytest.raises(folder.DatasetError) as err:
        folder.FolderSource(root, "val", palette=PALETTE[:5])
    _one_line(err, "data.palette", "5 colours for 7 classes")
    with pytest.raises(folder.DatasetError) as err:
        folder.FolderSource(root, "val", classes=["a", "b", "a"])
    _one_line(err, "'a' appears twice")
    with pytest.raises(folder.DatasetError) as err:
        folder.FolderSource(root, "val", ignore_index=3)
    _one_line(err, "ignore_index=3")
    (root / "classes.txt").write_text("a\n")
    with pytest.raises(folder.DatasetError) as err:
        folder.FolderSource(root, "val")
    _one_line(err, "both classes.txt and classes.json")
    (root / "classes.txt").unlink()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "val" / "val_000.jpg")
    with pytest.raises(folder.DatasetError) as err:
        folder.FolderSource(root, "val")
    _one_line(err, "val_000", "two image files")


def test_colour_mask_needs_a_palette_and_no_zero_reduction(dataset):
    root, _ = dataset
    (root / "classes.json").unlink()
    (root / "classes.txt").write_text("\n".join(NAMES))
    with pytest.raises(base.DatasetError) as err:
        _bad(root, "val_rgb")
    _one_line(err, "val_rgb", "no palette")
    with pytest.raises(base.DatasetError) as err:
        _bad(root, "val_rgb", palette=PALETTE, reduce_zero_label=True)
    _one_line(err, "reduce_zero_label")


def test_generated_folder_dataset_reads_both_label_kinds(tmp_path):
    """The package's generator (7 classes, palette PNGs, colour-mask split) through the reader;
    the reader pickles (grain workers copy sources)."""
    import pickle

    from rankseg_jax.data import folder_demo

    root = folder_demo.generate_folder(tmp_path, n_train=3, n_val=2, seed=0, max_side=80)
    train = folder.FolderSource(root, "train")
    train.check_layout()
    assert train.class_names == folder_demo.CLASS_NAMES and len(train) == 3
    np.testing.assert_array_equal(train.palette, folder_demo.PALETTE)
    assert Image.open(pathlib.Path(root) / "annotations" / "train" / "train_00000.png").mode == "P"
    seen = set()
    for i in range(len(train)):
        example = train[i]
        _, want = folder_demo.make_example(0, 0, i, 64, 80)
        np.testing.assert_array_equal(example["label"], want)
        seen |= set(np.unique(example["label"]).tolist())
    assert seen - {255} and seen <= set(range(7)) | {255}
    val, rgb = folder.FolderSource(root, "val"), folder.FolderSource(root, "val_rgb")
    for i in range(2):
        np.testing.assert_array_equal(rgb[i]["label"], val[i]["label"])
        np.testing.assert_array_equal(rgb[i]["image"], val[i]["image"])
    assert folder.available_splits(root) == ["train", "val", "val_rgb"]
    info = rgb.definition()
    assert info["class_names"] == list(folder_demo.CLASS_NAMES) and info["label_dtype"] == "uint8"
    assert info["ignore_color"] == [255, 255, 255] and info["palette"][2] == [6, 230, 230]
    json.dumps(info)  # JSON-ready
    copy = pickle.loads(pickle.dumps(rgb))
    np.testing.assert_array_equal(copy[1]["label"], val[1]["label"])
