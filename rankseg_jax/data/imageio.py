"""Image and label decoding for the dataset readers: any input becomes RGB uint8 or a 2-D label.

Images are decoded with OpenCV's `IMREAD_COLOR`, exactly as mmseg's `LoadImageFromFile` does, so
our pixels equal the reference's (we only flip BGR to RGB). That one call already makes every
input a 3-channel uint8 image:

* grayscale → the gray value in all three channels;
* RGBA / gray+alpha → the alpha channel is dropped (not composited);
* CMYK JPEG → RGB through libjpeg's CMYK conversion;
* 16-bit → 8-bit by `value >> 8` (the high byte);
* EXIF orientation → applied (the image is rotated/flipped as a viewer shows it).

Formats OpenCV cannot read (e.g. GIF) fall back to Pillow with the same rules.

Labels are decoded with Pillow, as mmseg's `LoadAnnotations` does (`np.asarray` of the file, so
a palette "P" PNG gives its indices, not colours). A label file's own EXIF orientation tag, if
it has one, is applied too. So the rule is the same for both files: **each file is shown the
way its own EXIF tag says**. Real segmentation labels (PNG/TIFF) carry no EXIF tag, so an
image whose JPEG is tagged "rotate 90°" must have a label drawn on the rotated view; if the
label was drawn on the stored pixels instead, the reader reports an image/label size mismatch
and says that the sizes are transposed.

Truncated files are detected: OpenCV returns nothing for them, and a JPEG/PNG whose end marker
is missing is re-decoded strictly by Pillow, which raises. Errors are `CorruptDataError` with
the path.
"""

from __future__ import annotations

import io
import os

import cv2
import numpy as np
from PIL import Image, ImageOps

from rankseg_jax.errors import CorruptDataError, DatasetNotFoundError

_EXIF_ORIENTATION = 0x0112
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of `path`; a missing or unreadable file raises a one-line DatasetError."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: {what} file not found") from None
    except OSError as e:
        raise CorruptDataError(f"{path}: cannot read {what} file ({e.strerror or e})") from None


def _looks_truncated(data: bytes) -> bool:
    """True when a JPEG or PNG lacks its end marker (EOI / IEND) near the end of the file."""
    if data.startswith(_JPEG_SOI):
        return _JPEG_EOI not in data[-1024:]
    if data.startswith(_PNG_SIGNATURE):
        return b"IEND" not in data[-64:]
    return False


def _pil_open_strict(data: bytes, path: str | os.PathLike, what: str) -> Image.Image:
    """A fully loaded Pillow image; truncated or unknown data raises CorruptDataError."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad files.
        reason = str(e).split("\n")[0] or type(e).__name__
        if "BytesIO" in reason:
            reason = "not a recognised image format"
        raise CorruptDataError(f"{path}: unreadable or truncated {what} ({reason})") from None
    return img


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any Pillow mode, with the same rules as cv2.IMREAD_COLOR."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        gray = np.asarray(img).astype(np.int64)
        gray = (np.clip(gray, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode == "F":
        gray = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert(img.mode[0] if img.mode != "PA" else "RGBA").convert("RGB")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to (H, W, 3) uint8 RGB (rules in the module docstring)."""
    if not data:
        raise CorruptDataError(f"{path}: unreadable or truncated image (empty file)")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or _looks_truncated(data):
        # OpenCV could not read it, or it may have silently filled a truncated tail with grey:
        # Pillow decodes strictly and raises with a reason for broken files.
        img = _pil_open_strict(data, path, "image")
        if bgr is None:
            return np.ascontiguousarray(_pil_to_rgb(img))
    if bgr.ndim != 3 or bgr.shape[-1] != 3 or bgr.dtype != np.uint8:
        raise CorruptDataError(f"{path}: unexpected decoded image {bgr.shape} {bgr.dtype}")
    return np.ascontiguousarray(bgr[..., ::-1])


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the image file at `path`."""
    return decode_image(read_bytes(path, "image"), path)


def decode_label(data: bytes, path: str | os.PathLike = "<bytes>") -> tuple[np.ndarray, str]:
    """The raw label array (H, W) of encoded label bytes, and the file's Pillow mode.

    The array is what `np.asarray(PIL.Image.open(f))` gives (after the file's own EXIF
    orientation): uint8 for "L"/"P", uint16 for "I;16", and more dimensions for colour modes.
    The caller checks the mode against its dataset.
    """
    if not data:
        raise CorruptDataError(f"{path}: unreadable or truncated label (empty file)")
    img = _pil_open_strict(data, path, "label")
    mode = img.mode
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return np.asarray(img), mode


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """The raw label array and Pillow mode of the label file at `path` (see decode_label)."""
    return decode_label(read_bytes(path, "label"), path)
