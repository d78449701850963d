"""Dataset readers: each layout built tiny and read back, decoding rules, and every clear error."""

from __future__ import annotations

import io
import pathlib

import cv2
import numpy as np
import pytest
from PIL import Image

from rankseg_jax.data import base, imageio
from rankseg_jax.data.readers import READERS, make_source
from rankseg_jax.errors import CorruptDataError, DatasetError, DatasetNotFoundError

H, W = 16, 24
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ file builders
def _rgb(h: int = H, w: int = W) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_jpg(path: pathlib.Path, rgb: np.ndarray | None = None) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".jpg", (_rgb() if rgb is None else rgb)[..., ::-1])
    path.write_bytes(data.tobytes())
    return path


def write_label(path: pathlib.Path, raw: np.ndarray, fmt: str = "PNG") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw).save(path, fmt)
    return path


def _raw(values: list[int], dtype=np.uint8, h: int = H, w: int = W) -> np.ndarray:
    """(h, w) raw label whose first row holds `values` and the rest is values[0]."""
    raw = np.full((h, w), values[0], dtype)
    raw[0, : len(values)] = values
    return raw


def build_ade(root: pathlib.Path, train: list[list[int]], val: list[list[int]]) -> pathlib.Path:
    ade = root / "ADEChallengeData2016"
    for split, prefix, labels in (("training", "train", train), ("validation", "val", val)):
        for i, values in enumerate(labels, 1):
            write_jpg(ade / "images" / split / f"ADE_{prefix}_{i:08d}.jpg")
            write_label(ade / "annotations" / split / f"ADE_{prefix}_{i:08d}.png", _raw(values))
    return ade


def build_coco10k(root: pathlib.Path, values: list[int], lists: bool = True) -> pathlib.Path:
    names = {"train": ["COCO_train2014_000000000009", "COCO_train2014_000000000077"]}
    names["test"] = ["COCO_train2014_000000000025"]
    for split, stems in names.items():
        for stem in stems:
            write_jpg(root / "images" / f"{split}2014" / f"{stem}.jpg")
            write_label(
                root / "annotations" / f"{split}2014" / f"{stem}_labelTrainIds.png", _raw(values)
            )
        if lists:
            (root / "imageLists").mkdir(exist_ok=True)
            (root / "imageLists" / f"{split}.txt").write_text("\n".join(stems[::-1]) + "\n")
    return root


def build_coco164k(root: pathlib.Path, values: list[int]) -> pathlib.Path:
    for split in ("train2017", "val2017"):
        write_jpg(root / "images" / split / "000000000139.jpg")
        write_label(root / "annotations" / split / "000000000139_labelTrainIds.png", _raw(values))
    return root


def build_pascal(root: pathlib.Path, values: list[int], palette_mode: bool = False):
    voc = root / "VOCdevkit" / "VOC2010"
    stems = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
    for split, ids in stems.items():
        for stem in ids:
            write_jpg(voc / "JPEGImages" / f"{stem}.jpg")
            path = voc / "SegmentationClassContext" / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(_raw(values))
            if palette_mode:
                img = img.convert("P")
                img.putpalette(list(range(256)) * 3)
            img.save(path)
        lists = voc / "ImageSets" / "SegmentationContext"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def build_ade_full(root: pathlib.Path, values: list[int]) -> pathlib.Path:
    full = root / "ADE20K_2021_17_01"
    for split, prefix in (("training", "train"), ("validation", "val")):
        write_jpg(full / "images_detectron2" / split / f"ADE_{prefix}_00000001.jpg")
        write_label(
            full / "annotations_detectron2" / split / f"ADE_{prefix}_00000001.tif",
            _raw(values, np.uint16),
            "TIFF",
        )
    return full


def first_row(source, index: int, n: int) -> list[int]:
    return source[index]["label"][0, :n].tolist()


# ------------------------------------------------------------------------- layouts read back
def test_ade20k_reduce_zero_label(tmp_path):
    ade = build_ade(tmp_path, [[0, 1, 150, 255, 7]], [[3, 0]])
    source = make_source("ade20k", ade, "training")
    source.check_layout()
    assert len(source) == 1 and source.n_cls == 150 and source.ignore_index == 255
    example = source[0]
    assert example["name"] == "ADE_train_00000001"
    assert example["image"].shape == (H, W, 3) and example["image"].dtype == np.uint8
    assert example["label"].shape == (H, W) and example["label"].dtype == np.int32
    assert first_row(source, 0, 5) == [255, 0, 149, 255, 6]
    assert int(example["label"][1:].max()) == 255  # the rest was raw 0
    # The parent folder and the split aliases work too.
    assert first_row(make_source("ade20k", tmp_path, "val"), 0, 2) == [2, 255]


def test_ade20k_image_pixels_match_cv2(tmp_path):
    ade = build_ade(tmp_path, [[1]], [[1]])
    path = ade / "images" / "training" / "ADE_train_00000001.jpg"
    expected = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(make_source("ade20k", ade, "training")[0]["image"], expected)


def test_coco_stuff10k_lists_and_reduce_zero_label(tmp_path):
    root = build_coco10k(tmp_path / "coco_stuff10k", [0, 1, 171, 255, 100])
    source = make_source("coco_stuff10k", root, "train")
    source.check_layout()
    assert source.n_cls == 171 and len(source.class_names) == 171
    # The list's order is kept (reversed on purpose in the builder).
    assert [source[i]["name"] for i in range(2)] == [
        "COCO_train2014_000000000077",
        "COCO_train2014_000000000009",
    ]
    assert first_row(source, 0, 5) == [255, 0, 170, 255, 99]
    assert len(make_source("coco_stuff10k", root, "test")) == 1


def test_coco_stuff10k_without_lists_scans_sorted(tmp_path):
    root = build_coco10k(tmp_path / "coco_stuff10k", [1], lists=False)
    source = make_source("coco_stuff10k", root, "train2014")
    source.check_layout()
    assert source.stems == sorted(source.stems) and len(source) == 2


def test_coco_stuff164k_no_reduction(tmp_path):
    root = build_coco164k(tmp_path / "coco_stuff164k", [0, 170, 255, 5])
    source = make_source("coco_stuff164k", root, "val2017")
    source.check_layout()
    assert first_row(source, 0, 4) == [0, 170, 255, 5]
    assert source[0]["name"] == "000000000139"
    with pytest.raises(DatasetError, match="171"):
        build_coco164k(tmp_path / "bad", [171])
        make_source("coco_stuff164k", tmp_path / "bad", "train")[0]


@pytest.mark.parametrize("palette_mode", [False, True])
def test_pascal_context_background_is_a_class(tmp_path, palette_mode):
    voc = build_pascal(tmp_path, [0, 59, 255, 12], palette_mode)
    for root in (voc, voc.parent):  # VOC2010 or VOCdevkit
        source = make_source("pascal_context", root, "train")
        source.check_layout()
        assert len(source) == 2 and source.class_names[0] == "background"
        assert first_row(source, 0, 4) == [0, 59, 255, 12]
    assert len(make_source("pascal_context", voc, "val")) == 1


def test_ade20k_full_uint16_ignore_65535(tmp_path):
    full = build_ade_full(tmp_path, [0, 255, 846, 65535, 1])
    source = make_source("ade20k_full", full, "training")
    source.check_layout()
    assert source.n_cls == 847 and source.ignore_index == 65535
    assert source.class_names[255] == "pier"  # 255 is a real class here
    assert first_row(source, 0, 5) == [0, 255, 846, 65535, 1]
    with pytest.raises(DatasetError, match="847"):
        make_source("ade20k_full", build_ade_full(tmp_path / "bad", [847]), "validation")[0]


def test_class_names_and_palettes():
    for name, reader in READERS.items():
        assert len(reader.class_names) == reader.n_cls, name
        assert len(set(reader.class_names)) == reader.n_cls or name == "coco_stuff10k", name
        assert reader.palette.shape == (reader.n_cls, 3) and reader.palette.dtype == np.uint8
        assert not 0 <= reader.ignore_index < reader.n_cls
    assert READERS["ade20k"].class_names[:3] == ("wall", "building", "sky")
    assert READERS["ade20k"].palette[0].tolist() == [120, 120, 120]
    assert READERS["coco_stuff164k"].class_names[-1] == "wood"
    assert READERS["ade20k_full"].class_names[-1] == "adding machine, totalizer, totaliser"
    np.testing.assert_array_equal(READERS["pascal_context"].palette, READERS["ade20k"].palette[:60])


def test_sources_pickle(tmp_path):
    import pickle

    source = make_source("ade20k", build_ade(tmp_path, [[1, 2]], [[1]]), "training")
    copy = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(copy[0]["label"], source[0]["label"])


# ------------------------------------------------------------------------------------ errors
def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_error_root_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        make_source("ade20k", tmp_path / "nowhere", "training")
    message = _one_line(error)
    for part in (str(tmp_path / "nowhere"), "data.root", "data/README.md", "configs/demo.py"):
        assert part in message
    assert isinstance(error.value, ValueError) and isinstance(error.value, FileNotFoundError)


def test_error_root_is_not_a_dataset_root(tmp_path):
    with pytest.raises(DatasetNotFoundError) as error:
        make_source("pascal_context", tmp_path, "train")
    assert "JPEGImages" in _one_line(error) and str(tmp_path) in str(error.value)


def test_error_split_folder_missing(tmp_path):
    ade = build_ade(tmp_path, [[1]], [[1]])
    for p in (ade / "annotations" / "validation").iterdir():
        p.unlink()
    (ade / "annotations" / "validation").rmdir()
    with pytest.raises(DatasetNotFoundError) as error:
        make_source("ade20k", ade, "validation")
    assert str(ade / "annotations" / "validation") in _one_line(error)


def test_error_split_list_missing(tmp_path):
    voc = build_pascal(tmp_path, [1])
    (voc / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        make_source("pascal_context", voc, "val")
    assert "val.txt" in _one_line(error) and "split list" in str(error.value)


def test_error_unknown_split_and_dataset(tmp_path):
    ade = build_ade(tmp_path, [[1]], [[1]])
    with pytest.raises(DatasetNotFoundError, match="unknown ade20k split 'trainval'"):
        make_source("ade20k", ade, "trainval")
    with pytest.raises(DatasetError, match="unknown data.dataset 'ade21k'"):
        make_source("ade21k", ade, "training")


def test_error_empty_split(tmp_path):
    ade = build_ade(tmp_path, [[1]], [])
    (ade / "images" / "validation").mkdir()
    (ade / "annotations" / "validation").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no .jpg images"):
        make_source("ade20k", ade, "validation").check_layout()


def test_error_listed_image_missing(tmp_path):
    root = build_coco10k(tmp_path, [1])
    (root / "images" / "train2014" / "COCO_train2014_000000000009.jpg").unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        make_source("coco_stuff10k", root, "train").check_layout()
    assert "COCO_train2014_000000000009.jpg" in _one_line(error) and "train.txt" in str(error.value)


def test_error_image_without_label(tmp_path):
    ade = build_ade(tmp_path, [[1], [2]], [[1]])
    label = ade / "annotations" / "training" / "ADE_train_00000002.png"
    label.unlink()
    source = make_source("ade20k", ade, "training")
    with pytest.raises(DatasetNotFoundError) as error:
        source.check_layout()
    message = _one_line(error)
    assert "ADE_train_00000002.jpg" in message and str(label) in message
    assert "image without label" in message and "1 of 2" in message
    with pytest.raises(DatasetNotFoundError, match="image without label"):
        source[1]


@pytest.mark.parametrize(
    "content, reason",
    [(b"not an image at all", "not a recognised image format"), (b"", "empty file")],
)
def test_error_unreadable_image(tmp_path, content, reason):
    ade = build_ade(tmp_path, [[1]], [[1]])
    image = ade / "images" / "training" / "ADE_train_00000001.jpg"
    image.write_bytes(content)
    with pytest.raises(CorruptDataError) as error:
        make_source("ade20k", ade, "training")[0]
    assert str(image) in _one_line(error) and reason in str(error.value)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_error_truncated_image(tmp_path, keep):
    ade = build_ade(tmp_path, [[1]], [[1]])
    image = ade / "images" / "training" / "ADE_train_00000001.jpg"
    write_jpg(image, _rgb(64, 64))
    data = image.read_bytes()
    image.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptDataError) as error:
        make_source("ade20k", ade, "training")[0]
    assert str(image) in _one_line(error) and "truncated" in str(error.value)


def test_error_truncated_label(tmp_path):
    ade = build_ade(tmp_path, [[1]], [[1]])
    label = ade / "annotations" / "training" / "ADE_train_00000001.png"
    write_label(label, RNG.integers(1, 150, (H, W), dtype=np.uint8))
    label.write_bytes(label.read_bytes()[:-30])
    with pytest.raises(CorruptDataError) as error:
        make_source("ade20k", ade, "training")[0]
    assert str(label) in _one_line(error) and "label" in str(error.value)


def test_error_label_wrong_mode(tmp_path):
    ade = build_ade(tmp_path, [[1]], [[1]])
    label = ade / "annotations" / "training" / "ADE_train_00000001.png"
    write_label(label, _rgb())  # an RGB label, like TFDS scene_parse150's instance maps
    with pytest.raises(DatasetError) as error:
        make_source("ade20k", ade, "training")[0]
    message = _one_line(error)
    assert str(label) in message and "mode RGB" in message and "scene_parse150" in message


def test_error_label_wrong_bit_depth(tmp_path):
    full = build_ade_full(tmp_path, [1])
    label = full / "annotations_detectron2" / "training" / "ADE_train_00000001.tif"
    write_label(label, _raw([1]), "TIFF")  # 8-bit, cannot hold the 65535 ignore value
    with pytest.raises(DatasetError, match="mode L.*16-bit"):
        make_source("ade20k_full", full, "training")[0]


def test_error_size_mismatch(tmp_path):
    ade = build_ade(tmp_path, [[1]], [[1]])
    image = write_jpg(ade / "images" / "training" / "ADE_train_00000001.jpg", _rgb(20, 30))
    label = ade / "annotations" / "training" / "ADE_train_00000001.png"
    with pytest.raises(DatasetError) as error:
        make_source("ade20k", ade, "training")[0]
    message = _one_line(error)
    assert str(label) in message and str(image) in message
    assert f"{H}x{W}" in message and "20x30" in message and "transposed" not in message


def test_error_label_values_outside_classes(tmp_path):
    ade = build_ade(tmp_path, [[1, 151, 200, 7]], [[1]])
    label = ade / "annotations" / "training" / "ADE_train_00000001.png"
    with pytest.raises(DatasetError) as error:
        make_source("ade20k", ade, "training")[0]
    message = _one_line(error)
    assert str(label) in message and "151, 200" in message and "150" in message


def test_unvalidated_labels_map_bad_values_to_ignore(tmp_path):
    ade = build_ade(tmp_path, [[1, 151]], [[1]])
    source = make_source("ade20k", ade, "training", validate_labels=False)
    assert first_row(source, 0, 2) == [0, 255]


# ---------------------------------------------------------------------------------- decoding
def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_decode_grayscale_gives_three_equal_channels():
    gray = RNG.integers(0, 256, (H, W), dtype=np.uint8)
    out = imageio.decode_image(_encode(Image.fromarray(gray), "PNG"))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_decode_rgba_drops_alpha():
    rgb = _rgb()
    rgba = np.dstack([rgb, RNG.integers(0, 256, (H, W, 1), dtype=np.uint8)])
    np.testing.assert_array_equal(imageio.decode_image(_encode(Image.fromarray(rgba), "PNG")), rgb)


def test_decode_cmyk_jpeg():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (200, 30, 40)
    rgb[:, 16:] = (20, 180, 220)
    data = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    out = imageio.decode_image(data)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - expected).max() <= 2  # tolerance: two decoders' rounding


def test_decode_16_bit_takes_high_byte():
    rgb16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    ok, data = cv2.imencode(".png", rgb16[..., ::-1])
    np.testing.assert_array_equal(
        imageio.decode_image(data.tobytes()), (rgb16 >> 8).astype(np.uint8)
    )
    gray16 = RNG.integers(0, 65536, (H, W), dtype=np.uint16)
    out = imageio.decode_image(_encode(Image.fromarray(gray16), "TIFF"))
    np.testing.assert_array_equal(out[..., 1], (gray16 >> 8).astype(np.uint8))


def test_decode_pil_fallback_for_formats_cv2_lacks():
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, W // 2 :] = 255
    out = imageio.decode_image(_encode(Image.fromarray(rgb), "GIF"))
    np.testing.assert_array_equal(out, rgb)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_exif_orientation_applied_to_image_and_label(tmp_path):
    """Stored 16x24, tagged 'rotate 90° clockwise' (6): both files come out 24x16, aligned."""
    stored = np.zeros((H, W, 3), np.uint8)
    stored[:, : W // 2] = 255  # left half white → top half after the rotation
    raw = np.where(stored[..., 0] > 0, 1, 2).astype(np.uint8)
    ade = build_ade(tmp_path, [[1]], [[1]])
    image = ade / "images" / "training" / "ADE_train_00000001.jpg"
    image.write_bytes(_encode(Image.fromarray(stored), "JPEG", quality=95, exif=_exif(6)))
    label = ade / "annotations" / "training" / "ADE_train_00000001.png"
    label.write_bytes(_encode(Image.fromarray(raw), "PNG", exif=_exif(6)))
    example = make_source("ade20k", ade, "training")[0]
    assert example["image"].shape == (W, H, 3)
    np.testing.assert_array_equal(example["label"], np.rot90(raw, k=-1).astype(np.int32) - 1)
    white = example["label"] == 0
    assert example["image"][white].min() > 200 and example["image"][~white].max() < 55


def test_exif_rotated_image_with_unrotated_label_says_transposed(tmp_path):
    ade = build_ade(tmp_path, [[1]], [[1]])
    image = ade / "images" / "training" / "ADE_train_00000001.jpg"
    image.write_bytes(_encode(Image.fromarray(_rgb()), "JPEG", exif=_exif(6)))
    with pytest.raises(DatasetError, match="transposed.*EXIF"):
        make_source("ade20k", ade, "training")[0]


def test_read_bytes_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="image file not found"):
        imageio.read_image(tmp_path / "gone.jpg")


def test_readers_have_no_stray_literal_ignore_values():
    """255 appears only in the dataset definitions (readers.py), not in the shared reader."""
    package = pathlib.Path(base.__file__).parent
    for name in ("base.py", "sources.py"):
        text = (package / name).read_text()
        assert "255" not in text.replace("65535", ""), name
    assert "ignore_index = 255" in (package / "readers.py").read_text()
