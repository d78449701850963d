"""Video in, overlay video and per-frame JSON lines out, in constant memory.

    report = predict_video("clip.mp4", predict_batch, "out/", class_names, palette)

reads the video with OpenCV in fixed-size batches of frames (at most `batch_size` decoded
frames are alive at once, so memory does not grow with the video's length), calls
`predict_batch(frames)` on each batch, and writes as it goes:

    out/<stem>_overlay.mp4   the frames with the prediction blended in (and a legend), same
                             frame rate and size as the input
    out/<stem>.jsonl         one JSON object per frame: frame index, time (s), the top-k classes
                             with names and scores, and the predicted classes' pixel shares

`predict_batch` maps uint8 RGB frames (B, H, W, 3) to (labels (B, H, W) int class ids,
scores (B, n_cls) float image-level class scores); `from_predictor` builds one from the
image predictor of `--mode=predict`. A progress bar shows frames/s. A missing, corrupt or
unreadable video is a one-line `VideoError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from rankseg_jax import visualize
from rankseg_jax.errors import DatasetError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
DEFAULT_BATCH = 8
DEFAULT_FPS = 25.0  # when a container does not say its frame rate
FOURCC = "mp4v"

PredictBatch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class VideoError(DatasetError):
    """A video that cannot be read or written; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says: fps, frame size, and its (possibly approximate) frame count."""

    path: str
    fps: float
    width: int
    height: int
    frame_count: int


def is_video(path: str | os.PathLike) -> bool:
    """True for a file name with one of VIDEO_SUFFIXES (what `--mode=predict` dispatches on)."""
    return os.fspath(path).lower().endswith(VIDEO_SUFFIXES)


def _open(path: str | os.PathLike) -> tuple[cv2.VideoCapture, VideoInfo]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"{path}: video file not found")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"{path}: not a video OpenCV can read (corrupt or unsupported format)")
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    info = VideoInfo(
        path=path,
        fps=fps if np.isfinite(fps) and fps > 0 else DEFAULT_FPS,
        width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
        height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        frame_count=max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))),
    )
    return capture, info


def probe(path: str | os.PathLike) -> VideoInfo:
    """The VideoInfo of a video file (raises VideoError when it cannot be opened)."""
    capture, info = _open(path)
    capture.release()
    return info


def frame_batches(path: str | os.PathLike, batch_size: int = DEFAULT_BATCH) -> Iterator[np.ndarray]:
    """uint8 RGB frame batches (b, H, W, 3), b = batch_size except maybe the last.

    Frames are decoded only as the batches are consumed, so at most one batch (plus the one
    the consumer still holds) is in memory. A video whose first frame cannot be decoded, or
    whose frames change size, raises VideoError; a stream that ends early (truncated file)
    simply ends.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    capture, info = _open(path)
    try:
        batch: list[np.ndarray] = []
        index = 0
        size: tuple[int, int] | None = None
        while True:
            ok, bgr = capture.read()
            if not ok or bgr is None:
                break
            if bgr.ndim != 3 or bgr.shape[2] != 3:
                raise VideoError(f"{info.path}: frame {index} has shape {bgr.shape}, not (H, W, 3)")
            if size is None:
                size = bgr.shape[:2]
            elif bgr.shape[:2] != size:
                raise VideoError(
                    f"{info.path}: frame {index} is {bgr.shape[1]}x{bgr.shape[0]}, earlier frames "
                    f"{size[1]}x{size[0]} (W x H)"
                )
            batch.append(bgr[..., ::-1])
            index += 1
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if index == 0:
            raise VideoError(f"{info.path}: no frame could be decoded (corrupt or empty video)")
        if batch:
            yield np.stack(batch)
    finally:
        capture.release()


@dataclasses.dataclass
class VideoReport:
    """What `predict_video` wrote: the overlay video, the JSON lines, frames, fps, seconds."""

    source: str
    overlay: str
    jsonl: str
    frames: int
    fps: float
    width: int
    height: int
    seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("nan")


def frame_record(
    index: int,
    fps: float,
    labels: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    topk: int,
) -> dict[str, Any]:
    """One frame's JSON: index, time, top-k classes by score, predicted classes' shares."""
    scores = np.asarray(scores, np.float64)
    order = np.argsort(-scores, kind="stable")[: max(1, min(topk, len(scores)))]
    name = lambda c: class_names[c] if 0 <= c < len(class_names) else f"id {c}"
    shares = visualize.class_shares(np.asarray(labels))
    present = {cls for cls, _, _ in shares}
    return {
        "frame": int(index),
        "time": round(index / fps, 6),
        "topk": [
            {
                "rank": r + 1,
                "id": int(c),
                "name": name(int(c)),
                "score": float(scores[c]),
                "predicted": int(c) in present,
            }
            for r, c in enumerate(order)
        ],  # fmt: skip
        "classes": [
            {"id": cls, "name": name(cls), "share": round(share, 6)} for cls, _, share in shares
        ],
    }


def predict_video(
    path: str | os.PathLike,
    predict_batch: PredictBatch,
    output: str | os.PathLike,
    class_names: Sequence[str],
    palette: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH,
    topk: int = 5,
    alpha: float = 0.5,
    legend: bool = True,
    progress: bool = True,
    name: str | None = None,
) -> VideoReport:
    """Predict every frame of a video; write the overlay video and the JSON lines as it goes.

    See the module docstring for the files. Memory is one batch of frames, its predictions and
    the encoder's buffers, whatever the video's length. Raises VideoError for an unreadable
    input or an output the encoder cannot open.
    """
    info = probe(path)
    out = pathlib.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or pathlib.Path(path).stem
    overlay_path = out / f"{stem}_overlay.mp4"
    jsonl_path = out / f"{stem}.jsonl"
    palette = np.asarray(palette, np.uint8)
    writer: cv2.VideoWriter | None = None
    frames = 0
    h, w = info.height, info.width
    start = time.perf_counter()
    bar = tqdm(total=info.frame_count or None, desc=f"video {stem}", unit="frame",
               disable=not progress, file=sys.stderr)  # fmt: skip
    try:
        with open(jsonl_path, "w", encoding="utf-8") as lines:
            for batch in frame_batches(path, batch_size):
                labels, scores = predict_batch(batch)
                labels, scores = np.asarray(labels), np.asarray(scores)
                if labels.shape != batch.shape[:3] or scores.shape[0] != len(batch):
                    raise ValueError(
                        f"predict_batch returned labels {labels.shape} and scores "
                        f"{scores.shape} for frames {batch.shape}"
                    )
                if writer is None:
                    h, w = batch.shape[1:3]
                    writer = cv2.VideoWriter(
                        str(overlay_path), cv2.VideoWriter_fourcc(*FOURCC), info.fps, (w, h)
                    )
                    if not writer.isOpened():
                        raise VideoError(f"{overlay_path}: OpenCV cannot write a {FOURCC} video")
                for frame, label, score in zip(batch, labels, scores, strict=True):
                    label = label.astype(np.int64)
                    picture = (
                        visualize.overlay_with_legend(frame, label, class_names, palette, alpha)
                        if legend
                        else visualize.blend(frame, label, palette, alpha)
                    )
                    writer.write(np.ascontiguousarray(picture[..., ::-1]))
                    record = frame_record(frames, info.fps, label, score, class_names, topk)
                    lines.write(json.dumps(record) + "\n")
                    frames += 1
                bar.update(len(batch))
    finally:
        bar.close()
        if writer is not None:
            writer.release()
    seconds = time.perf_counter() - start
    return VideoReport(
        source=info.path, overlay=str(overlay_path), jsonl=str(jsonl_path), frames=frames,
        fps=info.fps, width=int(w), height=int(h), seconds=seconds,
    )  # fmt: skip


def from_predictor(predictor: Any) -> PredictBatch:
    """A `predict_batch` from `--mode=predict`'s image predictor (called frame by frame).

    `predictor(image)` must return an object with `labels` (H, W) and `scores` (n_cls,), as
    `rankseg_jax.predict.Predictor` does (the test-time pipeline of the config: rescale,
    windows, flips).
    """

    def predict_batch(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        results = [predictor(np.ascontiguousarray(frame)) for frame in frames]
        labels = np.stack([np.asarray(r.labels) for r in results])
        scores = np.stack([np.asarray(r.scores, np.float32) for r in results])
        return labels, scores

    return predict_batch
