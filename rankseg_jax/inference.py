"""The one inference engine: sliding-window and whole-image inference (mmseg `EncoderDecoder`).

Model-agnostic: the model enters as `encode_decode(params, windows) -> logits`, a jittable
function from normalised windows (N, h, w, 3) float32 to logits (N, h, w, n_cls) at window
resolution (for RankSeg: with the per-window top-k and the -100 fill already applied).

What the reference does (rankseg-spec 4.1, 4.3), and how it runs here without recompiling per
image size:

* Windows: h_grids = max(H - crop_h + stride_h - 1, 0) // stride_h + 1; window i spans
  y2 = min(i * stride + crop, H), y1 = max(y2 - crop, 0) (same for x), so the last window is
  flush with the bottom/right edge, windows may overlap, and a side shorter than the crop gives
  a window of the image's own size on that side. All windows of one image share one shape.
  Windows of any number of images are batched together in fixed batches of `window_batch`
  (zero-padded, masked), so the model compiles once per window *shape*: once for full crops,
  plus once per distinct smaller window shape (an image side shorter than the crop). A smaller
  window must give exactly what the model gives at that size (the ViT pads to 16 and resizes
  its head output back to the unpadded size), so those shapes are compiled as they come and
  cached by `jax.jit`.
* Logits are summed on a canvas and divided by the window count. The canvas has a bucketed
  shape (each side rounded up to `canvas_multiple`, default the crop), and the merge places
  windows at traced offsets, so it compiles once per (canvas bucket, window shape).
* The averaged logits are resized to the original size with bilinear, align_corners=False
  (torch's source index max((dst + 0.5) * in / out - 0.5, 0), edge clamped), softmax over
  classes, un-flip, probabilities averaged over (scale, flip) passes, argmax. This runs on
  device in fixed output tiles (`tile`, rows x cols) with the sizes and the tile origin traced:
  memory is bounded by the tile whatever the image size, and it compiles once per canvas
  bucket. Metrics counts are computed in the same tile program (int32 on device).
* Models that read the label at test time (the GT-oracle head reads the whole image's class
  set in every window) get a small fixed-shape per-image context (`label_context`,
  `gt_class_set`) stacked alongside their windows, so they batch and compile like the others.

Compilation bound for a dataset (single scale, slide): the model once per window shape; the
canvas zeros, merge and two tile programs once per canvas bucket (x window shape for the merge);
one intersect-and-union program. `count_compilations` measures it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from rankseg_jax import metrics as metrics_lib
from rankseg_jax.errors import InputError
from rankseg_jax.models.segmenter import CANVAS_FILL

EncodeDecode = Callable[..., jax.Array]
"""(params, windows (N, h, w, 3) float32[, context (N, ...)]) -> logits (N, h, w, n_cls) float32.

The context argument exists only for an Inferencer built with `label_context` (GT oracle)."""

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # tools/test.py --aug-test


# ------------------------------------------------------------------------------------------
# Host-side geometry, following mmseg/mmcv exactly.


def rescale_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv `imrescale(keep_ratio=True)` output size (h, w) for a target scale such as (2048, 512).

    factor = min(max(scale) / long side, min(scale) / short side); side -> int(side * f + 0.5).
    """
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def rescale_image(image: np.ndarray, scale: Sequence[float] | None) -> np.ndarray:
    """Keep-ratio rescale with cv2 bilinear (as mmcv's Resize does); `None` keeps the image."""
    if scale is None:
        return image
    h, w = rescale_size(image.shape[0], image.shape[1], scale)
    if (h, w) == image.shape[:2]:
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def ms_scales(test_scale: Sequence[int], ratios: Sequence[float]) -> list[tuple[int, int]]:
    """MultiScaleFlipAug scales: (int(w * r), int(h * r)) for each ratio."""
    return [(int(test_scale[0] * r), int(test_scale[1] * r)) for r in ratios]


def normalize_image(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(image - mean) / std as mmcv's `imnormalize` computes it: (H, W, 3) -> float32.

    cv2 subtracts the mean in float32 and multiplies by 1 / std in float64 before rounding to
    float32; doing the same here gives bit-identical inputs (checked in the tests).
    """
    centred = image.astype(np.float32) - np.asarray(mean, np.float32)
    return (centred.astype(np.float64) * (1.0 / np.asarray(std, np.float64))).astype(np.float32)


def _grid(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(n):
        end = min(i * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def slide_windows(
    h: int, w: int, crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Windows (y1, y2, x1, x2) in the reference's order (rows outer, columns inner)."""
    rows = _grid(h, crop[0], stride[0])
    cols = _grid(w, crop[1], stride[1])
    return [(y1, y2, x1, x2) for y1, y2 in rows for x1, x2 in cols]


def window_coverage(
    h: int, w: int, crop: Sequence[int], stride: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """How many windows cover each row and column; the count map is their outer product.

    The windows are a product of row spans and column spans, so count(y, x) = cy[y] * cx[x].
    """
    cy = np.zeros(h, np.float32)
    cx = np.zeros(w, np.float32)
    for y1, y2 in _grid(h, crop[0], stride[0]):
        cy[y1:y2] += 1
    for x1, x2 in _grid(w, crop[1], stride[1]):
        cx[x1:x2] += 1
    return cy, cx


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ------------------------------------------------------------------------------------------
# Device programs.


def _linear_taps(dst: jax.Array, in_size: jax.Array, out_size: jax.Array):
    """torch bilinear (align_corners=False) taps for output indices dst: (i0, i1, lambda)."""
    scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
    src = jnp.maximum(scale * (dst.astype(jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
    lam = jnp.clip(src - i0.astype(jnp.float32), 0.0, 1.0)
    i1 = jnp.minimum(i0 + 1, in_size - 1)
    return i0, i1, lam


def resized_tile(
    canvas: jax.Array,
    cy: jax.Array,
    cx: jax.Array,
    sizes: jax.Array,
    origin: jax.Array,
    flip: jax.Array,
    tile: tuple[int, int],
) -> jax.Array:
    """One (R, T, C) tile of resize(canvas / count, original size), optionally un-flipped.

    canvas: (Hb, Wb, C) summed logits, valid in [:H, :W]; cy (Hb,), cx (Wb,) window counts;
    sizes: int32 [H, W, H0, W0]; origin: int32 [y, x] of the tile in the (H0, W0) output;
    flip: the pass ran on a horizontally flipped image, so output column x reads the resized
    map at W0 - 1 - x (torch's `output.flip(dims=(3,))`). Bilinear, align_corners=False, with
    torch's nesting order: rows outside, columns inside. Positions past (H0, W0) are clamped
    (garbage that callers mask). Everything but the tile shape is traced.
    """
    height, width, out_h, out_w = sizes[0], sizes[1], sizes[2], sizes[3]
    oy = origin[0] + jnp.arange(tile[0], dtype=jnp.int32)
    ox = origin[1] + jnp.arange(tile[1], dtype=jnp.int32)
    ox = jnp.where(flip, out_w - 1 - ox, ox)
    y0, y1, ly = _linear_taps(oy, height, out_h)
    x0, x1, lx = _linear_taps(ox, width, out_w)

    def mean_at(yi, xi):
        count = cy[yi][:, None, None] * cx[xi][None, :, None]
        return canvas[yi[:, None], xi[None, :]] / count

    wx0, wx1 = (1.0 - lx)[None, :, None], lx[None, :, None]
    top = wx0 * mean_at(y0, x0) + wx1 * mean_at(y0, x1)
    bottom = wx0 * mean_at(y1, x0) + wx1 * mean_at(y1, x1)
    return (1.0 - ly)[:, None, None] * top + ly[:, None, None] * bottom


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """How windows are cut, batched and merged.

    mode: "slide" (the reference for every Segmenter config) or "whole" (one pass over the
    whole image; compiles the model once per distinct image shape, for quick evals).
    crop, stride: (h, w). window_batch: windows per model call (padded and masked).
    canvas_multiple: canvas sides are rounded up to this (0 = max(crop)); larger means fewer
    compilations and more memory. tile: (rows, cols) of the output tiles (memory bound).
    rankseg_fill: the non-top-k fill of a RankSeg model (-100); when set, the classes a window
    selected (any logit above fill + 0.5) are tracked to report the top-k recall ceilings. An
    image's selected set is the union over its windows (and passes) of each window's top-k:
    exactly the classes its prediction can output. With one window it is the image's top-k,
    as in the training metrics; with several it can hold more than k classes.
    max_canvas_mb: canvases of images in flight are kept under this budget (at least one image).
    """

    mode: str = "slide"
    crop: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (512, 512)
    window_batch: int = 8
    canvas_multiple: int = 0
    tile: tuple[int, int] = (256, 1024)
    rankseg_fill: float | None = None
    max_canvas_mb: float = 4096.0

    def __post_init__(self) -> None:
        if self.mode not in ("slide", "whole"):
            raise InputError(f"eval mode must be 'slide' or 'whole', got {self.mode!r}")
        for name in ("crop", "stride", "tile"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                raise InputError(f"eval {name} must be two positive ints, got {value!r}")
        if self.window_batch < 1:
            raise InputError(f"eval window_batch must be >= 1, got {self.window_batch}")


@dataclasses.dataclass
class _Pass:
    """One (scale, flip) pass of one image: its normalised image and its logits canvas."""

    image: np.ndarray  # (H, W, 3) float32, already flipped when `flip`
    flip: bool
    context: np.ndarray | None = None  # the label context this pass's windows get
    canvas: jax.Array | None = None
    cy: np.ndarray | None = None
    cx: np.ndarray | None = None
    selected: list = dataclasses.field(default_factory=list)
    scores: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Prediction:
    """The result of one image. Arrays are numpy once `Inferencer` hands the job back.

    pred: (H0, W0) int32; probs: (H0, W0, C) float32 or None; counts: (3, C) int64 metrics
    counts (I, P, G) or None without a label; selected: (C,) bool classes in some window's
    top-k (RankSeg) or None; windows: model windows run for this image; window_scores: per
    pass, (windows of the pass, C) float32 image-level scores in window order, when
    `encode_decode` returns them (see `Inferencer`), else None; confusion: (C, C) int64
    (rows = label, columns = prediction, the pixels that `counts` scores) or None without a
    label.
    """

    pred: np.ndarray | None
    probs: np.ndarray | None
    counts: np.ndarray | None
    selected: np.ndarray | None
    windows: int
    tag: Any = None
    window_scores: list[np.ndarray] | None = None
    confusion: np.ndarray | None = None


@dataclasses.dataclass
class _Job:
    passes: list[_Pass]
    out_size: tuple[int, int]
    label: np.ndarray | None
    want_pred: bool
    want_probs: bool
    tag: Any
    context: np.ndarray | None = None
    pending: int = 0
    windows: int = 0
    canvas_bytes: int = 0
    tiles: list = dataclasses.field(default_factory=list)


class Inferencer:
    """Runs `encode_decode` over windows of many images, batched, with bounded compilations.

    params: the model parameters (passed through to `encode_decode`); n_cls: classes; the
    rest as in `InferenceConfig`. Use `predict` for one image, `run` for a stream.

    `encode_decode` may return `(logits, scores)` with scores (N, n_cls) per window from the
    same forward pass (e.g. RankSeg's image-level scores); each Prediction then carries them
    in `window_scores`, so a caller that wants both never runs the model twice per window.

    label_context: for models that read per-image information from the label at test time
    (the GT-oracle head reads the whole image's class set in every window): label (H0, W0) ->
    a fixed-shape array (e.g. `gt_class_set`, (1, n_cls) int32). `encode_decode` is then
    called as (params, windows, context (N, ...)), each window with its own image's context
    (padding rows get zeros). The shape is the same for every image, so it adds no
    compilation. A job takes its context from `context=` (every pass the same) or else from its
    label, per pass, as the reference test pipeline feeds it: the label resized (nearest) to
    that pass's image size and flipped with it (`pass_label`).
    """

    def __init__(
        self,
        encode_decode: EncodeDecode,
        params: Any,
        n_cls: int,
        config: InferenceConfig | None = None,
        *,
        ignore_index: int = 255,
        label_context: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.config = config or InferenceConfig()
        self.label_context = label_context
        self.params = params
        self.n_cls = n_cls
        self.ignore_index = ignore_index
        self.windows_run = 0
        self.batches_run = 0
        cfg = self.config
        self._multiple = cfg.canvas_multiple or max(cfg.crop)
        fill = cfg.rankseg_fill

        def forward(params, windows, *context):
            logits = encode_decode(params, windows, *context)
            scores = None
            if isinstance(logits, tuple):
                logits, scores = logits
                scores = scores.astype(jnp.float32)
            expected = windows.shape[:3] + (n_cls,)
            if logits.shape != expected:
                raise InputError(
                    f"encode_decode returned logits of shape {logits.shape}; expected "
                    f"{expected} (N, h, w, n_cls) at window resolution"
                )
            logits = logits.astype(jnp.float32)
            if fill is None:
                return logits, None, scores
            return logits, jnp.any(logits > fill + 0.5, axis=(1, 2)), scores

        self._forward = jax.jit(forward)
        self._zeros = jax.jit(partial(jnp.zeros, dtype=jnp.float32), static_argnums=0)
        self._merge = jax.jit(_merge_windows, donate_argnums=0)
        self._accumulate = jax.jit(partial(_accumulate_tile, tile=cfg.tile), donate_argnums=0)
        self._finish = jax.jit(
            partial(_finish_tile, tile=cfg.tile, n_cls=n_cls, ignore_index=ignore_index),
            static_argnames=("want_probs", "with_label"),
        )

    # ---- one image -----------------------------------------------------------------------

    def predict(
        self,
        image: np.ndarray,
        out_size: tuple[int, int] | None = None,
        *,
        flip: bool = False,
        return_probs: bool = False,
        label: np.ndarray | None = None,
        context: np.ndarray | None = None,
    ) -> Prediction:
        """Reference `inference(img, rescale=True)` for one normalised image (H, W, 3) float32.

        out_size: the original (H0, W0) to resize to (default: the image's own size). flip:
        run on the flipped image and flip the output back. Returns pred (H0, W0) int32, probs
        (H0, W0, C) when asked, metric counts when a label (H0, W0) is given. context: see
        `label_context`.
        """
        passes = [(np.ascontiguousarray(image[:, ::-1]) if flip else image, flip)]
        return self.predict_passes(
            passes, out_size, return_probs=return_probs, label=label, context=context
        )

    def predict_passes(
        self,
        passes: Sequence[tuple[np.ndarray, bool]],
        out_size: tuple[int, int] | None = None,
        *,
        return_probs: bool = False,
        label: np.ndarray | None = None,
        context: np.ndarray | None = None,
    ) -> Prediction:
        """`aug_test`: probabilities of several (image, flipped) passes averaged, then argmax.

        Each image is normalised float32 (H_i, W_i, 3), already flipped where flipped is True.
        """
        out_size = out_size or passes[0][0].shape[:2]
        job = self.make_job(passes, out_size, label=label, want_probs=return_probs, context=context)
        (done,) = list(self.run([job]))
        return done

    # ---- streams -------------------------------------------------------------------------

    def make_job(
        self,
        passes: Sequence[tuple[np.ndarray, bool]],
        out_size: tuple[int, int],
        *,
        label: np.ndarray | None = None,
        want_pred: bool = True,
        want_probs: bool = False,
        tag: Any = None,
        context: np.ndarray | None = None,
    ) -> _Job:
        """Package one image's passes for `run`; checks shapes and dtypes with clear errors."""
        if not passes:
            raise InputError("an image needs at least one (image, flip) pass")
        checked = []
        for image, flip in passes:
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.float32:
                raise InputError(
                    f"pass images must be normalised float32 (H, W, 3); got {image.dtype} "
                    f"{image.shape}"
                )
            checked.append(_Pass(image=image, flip=bool(flip)))
        out_size = (int(out_size[0]), int(out_size[1]))
        if label is not None:
            label = np.asarray(label)
            if label.shape != out_size or not np.issubdtype(label.dtype, np.integer):
                raise InputError(
                    f"label must be an integer array of shape {out_size}; got {label.dtype} "
                    f"{label.shape}"
                )
        if self.label_context is not None and context is None:
            if label is None:
                raise InputError(
                    "this model reads the image's label at test time (GT-oracle head): give "
                    "the label map or its context"
                )
            for p in checked:
                p.context = np.asarray(
                    self.label_context(pass_label(label, p.image.shape[:2], p.flip))
                )
            context = checked[0].context
        elif context is not None:
            if self.label_context is None:
                raise InputError("context given, but the Inferencer has no label_context")
            context = np.asarray(context)
            for p in checked:
                p.context = context
        return _Job(checked, out_size, label, want_pred, want_probs, tag, context)

    def run(self, jobs: Iterable[_Job], lag: int = 2) -> Iterator[Prediction]:
        """Predictions for a stream of jobs, as numpy, in the order the images complete.

        Each carries its job's `tag` (evaluate uses the example index). Windows of consecutive
        images share model batches; up to `lag` finished images wait on device before being
        pulled to the host, so the host never stalls the device.
        """
        queues: dict[tuple[int, int], list] = collections.OrderedDict()
        inflight: list[_Job] = []
        finished: collections.deque[_Job] = collections.deque()
        budget = self.config.max_canvas_mb * 2**20
        used = 0

        def complete_ready():
            nonlocal used
            for job in [j for j in inflight if j.pending == 0]:
                inflight.remove(job)
                used -= job.canvas_bytes
                self._finish_job(job)
                finished.append(job)

        for job in jobs:
            job.canvas_bytes = need = self._job_bytes(job)
            if inflight and used + need > budget:
                self._flush(queues)
                complete_ready()
            self._start_job(job, queues)
            inflight.append(job)
            used += need
            for shape in list(queues):
                while len(queues.get(shape, ())) >= self.config.window_batch:
                    self._run_batch(queues, shape)
            complete_ready()
            while len(finished) > lag:
                yield self._collect(finished.popleft())
        self._flush(queues)
        complete_ready()
        while finished:
            yield self._collect(finished.popleft())

    # ---- internals -----------------------------------------------------------------------

    def _window_shape(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        if self.config.mode == "whole":
            return (h, w), (h, w)
        crop, stride = self.config.crop, self.config.stride
        return (min(crop[0], h), min(crop[1], w)), stride

    def _canvas_shape(self, h: int, w: int) -> tuple[int, int, int]:
        return (_round_up(h, self._multiple), _round_up(w, self._multiple), self.n_cls)

    def _job_bytes(self, job: _Job) -> int:
        return sum(4 * math.prod(self._canvas_shape(*p.image.shape[:2])) for p in job.passes)

    def _start_job(self, job: _Job, queues: dict) -> None:
        for p in job.passes:
            h, w = p.image.shape[:2]
            crop, stride = self._window_shape(h, w)
            shape = self._canvas_shape(h, w)
            p.canvas = self._zeros(shape)
            cy, cx = window_coverage(h, w, crop, stride)
            p.cy = np.pad(cy, (0, shape[0] - h))
            p.cx = np.pad(cx, (0, shape[1] - w))
            for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
                queues.setdefault((y2 - y1, x2 - x1), []).append((job, p, y1, x1))
                job.pending += 1
                job.windows += 1

    def _run_batch(self, queues: dict, shape: tuple[int, int]) -> None:
        items = queues[shape][: self.config.window_batch]
        queues[shape] = queues[shape][len(items) :]
        if not queues[shape]:
            del queues[shape]
        h, w = shape
        size = self.config.window_batch
        windows = np.zeros((size, h, w, 3), np.float32)
        offsets = np.zeros((size, 2), np.int32)
        for row, (_, p, y1, x1) in enumerate(items):
            windows[row] = p.image[y1 : y1 + h, x1 : x1 + w]
            offsets[row] = (y1, x1)
        context = ()
        if self.label_context is not None:
            first = items[0][1].context
            stacked = np.zeros((size, *first.shape), first.dtype)
            for row, (_, p, _, _) in enumerate(items):
                stacked[row] = p.context
            context = (stacked,)
        logits, selected, scores = self._forward(self.params, windows, *context)
        self.windows_run += len(items)
        self.batches_run += 1
        rows_of: dict[int, list[int]] = collections.OrderedDict()
        for row, (_, p, _, _) in enumerate(items):
            rows_of.setdefault(id(p), []).append(row)
        for rows in rows_of.values():
            job, p = items[rows[0]][0], items[rows[0]][1]
            valid = np.zeros(size, bool)
            valid[rows] = True
            p.canvas = self._merge(p.canvas, logits, offsets, valid)
            if selected is not None:
                p.selected.append((selected, valid))
            if scores is not None:
                p.scores.append((scores, valid))
            job.pending -= len(rows)

    def _flush(self, queues: dict) -> None:
        for shape in list(queues):
            while shape in queues:
                self._run_batch(queues, shape)

    def _finish_job(self, job: _Job) -> None:
        """Dispatch the tile programs of a job whose windows are all merged (no host sync)."""
        out_h, out_w = job.out_size
        rows, cols = self.config.tile
        label = None
        if job.label is not None:
            label = np.full(
                (_round_up(out_h, rows), _round_up(out_w, cols)), self.ignore_index, np.int32
            )
            label[:out_h, :out_w] = job.label
        args = []
        for p in job.passes:
            h, w = p.image.shape[:2]
            sizes = np.array([h, w, out_h, out_w], np.int32)
            args.append((p.canvas, p.cy, p.cx, sizes, np.bool_(p.flip)))
        denom = np.float32(len(job.passes))
        for y in range(0, out_h, rows):
            for x in range(0, out_w, cols):
                origin = np.array([y, x], np.int32)
                acc = self._zeros((rows, cols, self.n_cls))
                for canvas, cy, cx, sizes, flip in args[:-1]:
                    acc = self._accumulate(acc, canvas, cy, cx, sizes, origin, flip)
                canvas, cy, cx, sizes, flip = args[-1]
                label_tile = None if label is None else label[y : y + rows, x : x + cols]
                out = self._finish(
                    acc, canvas, cy, cx, sizes, origin, flip, denom, label_tile,
                    want_probs=job.want_probs, with_label=label is not None,
                )  # fmt: skip
                job.tiles.append(((y, x), out))
        for p in job.passes:
            p.canvas = None
            p.image = None

    def _collect(self, job: _Job) -> Prediction:
        out_h, out_w = job.out_size
        rows, cols = self.config.tile
        pred = np.zeros((out_h, out_w), np.int32) if job.want_pred else None
        probs = np.zeros((out_h, out_w, self.n_cls), np.float32) if job.want_probs else None
        counts = None if job.label is None else np.zeros((3, self.n_cls), np.int64)
        confusion = None if job.label is None else np.zeros((self.n_cls,) * 2, np.int64)
        for (y, x), (tile_pred, tile_probs, tile_counts, tile_confusion) in job.tiles:
            h, w = min(rows, out_h - y), min(cols, out_w - x)
            if pred is not None:
                pred[y : y + h, x : x + w] = np.asarray(tile_pred)[:h, :w]
            if probs is not None:
                probs[y : y + h, x : x + w] = np.asarray(tile_probs)[:h, :w]
            if counts is not None:
                counts += np.asarray(tile_counts).astype(np.int64)
                confusion += np.asarray(tile_confusion).astype(np.int64)
        selected = None
        if self.config.rankseg_fill is not None:
            selected = np.zeros(self.n_cls, bool)
            for p in job.passes:
                for sel, valid in p.selected:
                    selected |= np.asarray(sel)[valid].any(axis=0)
        window_scores = None
        if any(p.scores for p in job.passes):
            window_scores = [
                np.concatenate([np.asarray(sc)[valid] for sc, valid in p.scores])
                for p in job.passes
            ]
        return Prediction(
            pred, probs, counts, selected, job.windows, job.tag, window_scores, confusion
        )


def _merge_windows(canvas, logits, offsets, valid):
    """Add each valid window's logits (B, h, w, C) into the canvas at its (y, x) offset."""
    h, w, n_cls = logits.shape[1:]

    def add(i, canvas):
        start = (offsets[i, 0], offsets[i, 1], 0)
        current = lax.dynamic_slice(canvas, start, (h, w, n_cls))
        updated = jnp.where(valid[i], current + logits[i], current)
        return lax.dynamic_update_slice(canvas, updated, start)

    return lax.fori_loop(0, logits.shape[0], add, canvas)


def _accumulate_tile(acc, canvas, cy, cx, sizes, origin, flip, *, tile):
    """acc + softmax(resized tile) of one pass: (R, T, C)."""
    return acc + jax.nn.softmax(resized_tile(canvas, cy, cx, sizes, origin, flip, tile), -1)


def _finish_tile(
    acc, canvas, cy, cx, sizes, origin, flip, denom, label,
    *, tile, n_cls, ignore_index, want_probs, with_label,
):  # fmt: skip
    """Last pass: probabilities averaged over passes, argmax, and the tile's metric counts
    (I, P, G) and confusion matrix (int32, per tile; summed in int64 on the host)."""
    probs = _accumulate_tile(acc, canvas, cy, cx, sizes, origin, flip, tile=tile) / denom
    pred = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    counts = confusion = None
    if with_label:
        oy = origin[0] + jnp.arange(tile[0])[:, None]
        ox = origin[1] + jnp.arange(tile[1])[None, :]
        inside = (oy < sizes[2]) & (ox < sizes[3])
        counts = metrics_lib.intersect_and_union(pred, label, n_cls, ignore_index, inside)
        confusion = metrics_lib.confusion_counts(pred, label, n_cls, ignore_index, inside)
    return pred, probs if want_probs else None, counts, confusion


def settings_from_config(config: Any) -> tuple[InferenceConfig, dict[str, Any]]:
    """The InferenceConfig and the test-pipeline keyword arguments a project config asks for.

    Reads eval.{mode, crop, stride, window_batch, scales, flip, max_images}, data.{test_scale,
    mean, std}, model.classifier (RankSeg and GT heads fill the non-top-k classes with
    CANVAS_FILL, so the top-k ceilings are reported).
    """
    head = config.model.classifier
    inference = InferenceConfig(
        mode=config.eval.mode,
        crop=tuple(config.eval.crop),
        stride=tuple(config.eval.stride),
        window_batch=int(config.eval.window_batch),
        tile=tuple(config.eval.tile),
        rankseg_fill=CANVAS_FILL if head in ("rankseg", "gt") else None,
    )
    kwargs = dict(
        mean=tuple(config.data.mean),
        std=tuple(config.data.std),
        test_scale=tuple(config.data.test_scale),
        ratios=tuple(config.eval.scales),
        flip=bool(config.eval.flip),
        max_images=int(config.eval.max_images),
    )
    return inference, kwargs


# ------------------------------------------------------------------------------------------
# Compilation counting.


@contextlib.contextmanager
def count_compilations() -> Iterator[list[str]]:
    """Collect the names of the XLA backend compilations that happen inside the block.

    Listens to jax.monitoring's `/jax/core/compile/backend_compile_duration` event (jax 0.10.2,
    `jax/_src/dispatch.py`); a persistent-cache hit is not a compilation here.
    """
    names: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE_EVENT:
            names.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ------------------------------------------------------------------------------------------
# Jobs from images and from the eval pipeline's batches.


def image_passes(
    image: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    test_scale: Sequence[int] | None = (2048, 512),
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
) -> list[tuple[np.ndarray, bool]]:
    """The reference test pipeline for one image: rescale, flip, normalise, per (ratio, flip).

    image: (H0, W0, 3) uint8 RGB (resized with cv2 bilinear as uint8, then normalised), or
    float32 already normalised (resized as float). test_scale None: no rescale (one ratio).
    Scales are (int(w * r), int(h * r)) of `test_scale`, keep-ratio (mmcv imrescale).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image must be (H, W, 3); got shape {image.shape}")
    if image.dtype not in (np.uint8, np.float32):
        raise InputError(f"image must be uint8 (raw) or float32 (normalised); got {image.dtype}")
    scales = [None] if test_scale is None else ms_scales(test_scale, ratios)
    passes = []
    for scale in scales:
        resized = rescale_image(image, scale)
        for flipped in (False, True) if flip else (False,):
            view = resized[:, ::-1] if flipped else resized
            if view.dtype == np.uint8:
                view = normalize_image(view, mean, std)
            passes.append((np.ascontiguousarray(view, np.float32), flipped))
    return passes


def pass_label(label: np.ndarray, size: Sequence[int], flip: bool = False) -> np.ndarray:
    """The label (H0, W0) as the reference test pipeline hands it to the model for one pass.

    mmseg's `_gt` test pipelines load the annotation and run it through the same
    MultiScaleFlipAug as the image: `Resize` (keep-ratio `mmcv.imrescale`, nearest neighbour:
    cv2 INTER_NEAREST to the size the image got) then `RandomFlip`. `size`: that pass's image
    (h, w). Nearest downscaling can drop a small class, so the GT-oracle head's class set is
    taken from this label, not from the original-size one. Returns (h, w) with the label's dtype.
    """
    label = np.asarray(label)
    h, w = int(size[0]), int(size[1])
    if label.shape[:2] != (h, w):
        wide = label.astype(np.int32)  # cv2 resizes int32 (uint16 ADE-Full ids fit)
        label = cv2.resize(wide, (w, h), interpolation=cv2.INTER_NEAREST).astype(label.dtype)
    return np.ascontiguousarray(label[:, ::-1]) if flip else label


def gt_class_set(label: np.ndarray, n_cls: int) -> np.ndarray:
    """A (1, n_cls) int32 "label" that carries only the class set of `label` (H, W).

    Entry c is c where class c occurs in the label, else n_cls (not a class). The GT-oracle
    head reads only the set of classes of its `gt_labels`, so this small fixed-shape stand-in
    gives every window the whole image's class set (the reference passes the whole-image label
    to every window) without a per-size compilation.
    """
    label = np.asarray(label).ravel()
    present = np.zeros(n_cls, bool)
    values = label[(label >= 0) & (label < n_cls)].astype(np.int64)
    present[np.unique(values)] = True
    return np.where(present, np.arange(n_cls), n_cls).astype(np.int32)[None]


def _checked_label(label: Any, image_shape: tuple[int, ...], index: Any) -> np.ndarray:
    label = np.asarray(label)
    if label.shape != tuple(image_shape[:2]):
        raise InputError(
            f"example {index}: label shape {label.shape} does not match image shape "
            f"{tuple(image_shape[:2])}"
        )
    return label.astype(np.int32)


def batch_jobs(
    inferencer: Inferencer, batches: Iterable[Mapping[str, Any]], *, flip: bool = False
) -> Iterator[_Job]:
    """Jobs from the eval pipeline's batches (`rankseg_jax.data.pipeline.eval_batches`).

    Each batch holds lists `image` (normalised float32 (h, w, 3), already keep-ratio resized to
    the test scale), `label` (H0, W0) class ids, `valid`, `index`, and with several eval scales
    `scaled` (one image per ratio). Passes: every scale, plus its horizontal flip when `flip`.
    Padding entries (valid False) are dropped. The tag is the dataset index.
    """
    for batch in batches:
        scaled = batch.get("scaled")
        for row, valid in enumerate(batch["valid"]):
            if not valid:
                continue
            index = int(batch["index"][row])
            images = scaled[row] if scaled is not None else (batch["image"][row],)
            passes = []
            for image in images:
                passes.append((np.asarray(image, np.float32), False))
                if flip:
                    passes.append((np.ascontiguousarray(image[:, ::-1], np.float32), True))
            label = np.asarray(batch["label"][row])
            label = _checked_label(label, label.shape, index)
            yield inferencer.make_job(passes, label.shape, label=label, want_pred=False, tag=index)


class Scorer:
    """Runs jobs through an Inferencer and accumulates mIoU counts and top-k ceilings.

    Kept separate from the loop so that several processes can each score their share and
    merge `counts` / `recall` before `result()` (see `rankseg_jax.evaluation`).
    """

    def __init__(self, inferencer: Inferencer, class_names: Sequence[str] | None = None):
        self.inferencer = inferencer
        self.meter = metrics_lib.MeanIoU(inferencer.n_cls, class_names)
        self.confusion = metrics_lib.ConfusionMatrix(inferencer.n_cls, class_names)
        topk = inferencer.config.rankseg_fill is not None
        self.recall = metrics_lib.TopkRecall() if topk else None
        self.seconds = 0.0
        self.windows = 0
        self.compilations = 0

    def consume(
        self,
        jobs: Iterable[_Job],
        *,
        progress: bool = True,
        total: int | None = None,
        on_image: Callable[[Prediction], None] | None = None,
    ) -> None:
        """Score a stream of jobs (each with a label); a tqdm bar when `progress`."""
        windows_before = self.inferencer.windows_run
        start = time.perf_counter()
        with count_compilations() as compiled:
            stream = self.inferencer.run(jobs)
            if progress:
                stream = tqdm(stream, total=total, desc="eval", unit="img")
            for done in stream:
                self.meter.update(done.counts)
                self.confusion.update(done.confusion)
                if self.recall is not None:
                    self.recall.update(done.selected, done.counts[metrics_lib.LABEL])
                if on_image is not None:
                    on_image(done)
        self.seconds += time.perf_counter() - start
        self.windows += self.inferencer.windows_run - windows_before
        self.compilations += len(compiled)

    def result(self) -> dict[str, Any]:
        """`MeanIoU.result()` plus topk, eval_time_s, images_per_s, windows, windows_per_s,
        compilations."""
        seconds = self.seconds
        results = self.meter.result()
        if self.recall is not None:
            results["topk"] = self.recall.result()
        results.update(
            eval_time_s=seconds,
            images_per_s=self.meter.num_images / seconds if seconds else math.nan,
            windows=self.windows,
            windows_per_s=self.windows / seconds if seconds else math.nan,
            compilations=self.compilations,
        )
        return results
