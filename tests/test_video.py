"""Video in → overlay video (same fps and size) + one JSON line per frame, in constant memory."""

from __future__ import annotations

import json
import tracemalloc

import cv2
import numpy as np
import pytest

from rankseg_jax import video
from rankseg_jax.data import readers

N_CLS = 6
NAMES = [f"class{i}" for i in range(N_CLS)]
FPS = 12.0
H, W = 72, 96


def write_video(path, frames: int, seed: int = 0) -> None:
    """A moving gradient plus noise, mp4v, FPS, W x H."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
    assert writer.isOpened()
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    for t in range(frames):
        base = np.stack([(xx * 2 + t * 5) % 256, (yy * 3) % 256, (xx + yy + t) % 256], -1)
        noise = rng.integers(0, 20, (H, W, 3))
        writer.write(np.clip(base + noise, 0, 255).astype(np.uint8))
    writer.release()


class TinyModel:
    """A random per-pixel linear classifier: colours (B, H, W, 3) → logits (B, H, W, N_CLS)."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(3, N_CLS)).astype(np.float32)
        self.b = rng.normal(size=N_CLS).astype(np.float32)
        self.calls: list[int] = []

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append(len(frames))
        logits = (frames.astype(np.float32) / 127.5 - 1.0) @ self.w + self.b
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return logits.argmax(-1), probs.mean(axis=(1, 2))


@pytest.fixture(scope="module")
def clip40(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip40.mp4"
    write_video(path, 40)
    return path


def test_forty_frames_in_forty_out(clip40, tmp_path):
    model = TinyModel()
    palette = readers.generic_palette(N_CLS)
    report = video.predict_video(clip40, model, tmp_path, NAMES, palette, batch_size=8,
                                 topk=3, progress=False)  # fmt: skip
    assert report.frames == 40 and model.calls == [8] * 5
    out = cv2.VideoCapture(report.overlay)
    assert out.isOpened()
    assert out.get(cv2.CAP_PROP_FPS) == pytest.approx(FPS, rel=1e-3)
    count = 0
    while True:
        ok, frame = out.read()
        if not ok:
            break
        assert frame.shape == (H, W, 3)
        count += 1
    out.release()
    assert count == 40
    lines = open(report.jsonl).read().splitlines()
    assert len(lines) == 40
    records = [json.loads(line) for line in lines]
    assert [r["frame"] for r in records] == list(range(40))
    assert records[12]["time"] == pytest.approx(1.0)
    frames = np.concatenate(list(video.frame_batches(clip40, 16)))
    assert frames.shape == (40, H, W, 3) and frames.dtype == np.uint8
    for i in (0, 39):
        labels, scores = model(frames[i : i + 1])
        want = np.argsort(-scores[0], kind="stable")[:3]
        assert [t["id"] for t in records[i]["topk"]] == want.tolist()
        assert records[i]["topk"][0]["name"] == NAMES[want[0]]
        assert records[i]["topk"][0]["score"] == pytest.approx(float(scores[0, want[0]]), 1e-6)
        shares = {c["id"]: c["share"] for c in records[i]["classes"]}
        ids, counts = np.unique(labels[0], return_counts=True)
        want_shares = dict(zip(ids.tolist(), counts / labels[0].size, strict=True))
        assert shares == pytest.approx(want_shares, 1e-5)


def _peak_bytes(path, out, batch_size: int) -> int:
    tracemalloc.start()
    try:
        video.predict_video(path, TinyModel(), out, NAMES, readers.generic_palette(N_CLS),
                            batch_size=batch_size, progress=False)  # fmt: skip
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_length(clip40, tmp_path):
    """Peak traced memory of a 400-frame video ≤ 1.25 × the 40-frame one + 1 MiB; holding its
    400 frames alone would take 400·72·96·3 B ≈ 7.9 MiB."""
    long = tmp_path / "clip400.mp4"
    write_video(long, 400, seed=1)
    short_peak = _peak_bytes(clip40, tmp_path / "a", 8)
    long_peak = _peak_bytes(long, tmp_path / "b", 8)
    assert long_peak <= 1.25 * short_peak + (1 << 20), (short_peak, long_peak)
    # The measurement sees decoded frames: keeping them all does exceed the bound.
    tracemalloc.start()
    kept = list(video.frame_batches(long, 8))
    held = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(kept) == 50 and held > 1.25 * short_peak + (1 << 20)


def test_corrupt_and_missing_video_are_one_line(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with pytest.raises(video.VideoError) as err:
        video.predict_video(bad, TinyModel(), tmp_path, NAMES, readers.generic_palette(N_CLS),
                            progress=False)  # fmt: skip
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(video.VideoError, match="not found"):
        video.probe(tmp_path / "nothing.mp4")
    assert video.is_video("a/B.MP4") and not video.is_video("a/b.png")


def test_from_predictor_adapts_the_image_predictor():
    class Result:
        def __init__(self, frame):
            self.labels = (frame[..., 0] > 127).astype(np.int32)
            self.scores = np.array([0.2, 0.8], np.float32)

    frames = np.zeros((3, 8, 9, 3), np.uint8)
    frames[1, :, :4] = 255
    labels, scores = video.from_predictor(Result)(frames)
    assert labels.shape == (3, 8, 9) and scores.shape == (3, 2)
    assert labels[1, :, :4].all() and not labels[0].any()
