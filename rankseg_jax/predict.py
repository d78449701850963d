"""`--mode=predict`: label maps, coloured maps, overlays, class rankings and figures per image.

    python main.py --config=configs/demo.py --workdir=DIR --mode=predict \
        --config.predict.input=PATH --config.predict.output=OUT

PATH is an image file, a folder (its images, not recursive) or a glob (`**` recurses). Weights
come from the workdir's latest checkpoint, else `init_from`. Without `predict.input` a few
images of the generated dataset are predicted (the demo), and then, and only then, a model
without any weights falls back to its seeded random initialisation with a warning.

Per image `<name>` (the file stem, made unique) under OUT (default `<workdir>/predict`):

    labels/<name>.png     class ids, uint8 (uint16 when an id exceeds 255); with
                          predict.submission_format the ADE challenge format (id + 1)
    color/<name>.png      the label map in the dataset's palette
    overlay/<name>.png    the image with the prediction blended in and a legend (image size)
    json/<name>.json      image-level top-k classes (names, scores), each predicted class's
                          pixel share, the classes RankSeg's windows selected
    figures/<name>.png    image | prediction | top-k score bars, present classes marked
                          (predict.figures)
    contact_sheet.png     overlays of up to 48 images (predict.figures, more than one image)
    summary.json          what was written, what failed and why, the weights used

Unreadable images are reported by name and skipped. The mode's exit code is 0 when at least
one image was written, 1 when none was (all unreadable), 2 for a bad input path or missing
weights.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import cv2
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from rankseg_jax import inference, visualize
from rankseg_jax.data import imageio, synthetic
from rankseg_jax.errors import CheckpointNotFoundError, DatasetError, InputError
from rankseg_jax.segmentor import Segmentor, check_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DEMO_IMAGES = 4
FIGURE_TOPK = 12
JSON_TOPK_NO_RANKSEG = 20
CONTACT_SHEET_MAX = 48
SUBDIRS = ("labels", "color", "overlay", "json", "figures")


# ------------------------------------------------------------------------------------------
# Inputs and weights.


def find_images(spec: str) -> list[pathlib.Path]:
    """The image files `spec` names: a file, a folder's images (sorted) or a glob's matches.

    A file given by name is used whatever its suffix; folders and globs keep IMAGE_SUFFIXES.
    Raises InputError when nothing matches.
    """
    path = pathlib.Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and _is_image_name(p))
        where = f"folder {path}"
    elif glob.has_magic(spec):
        matches = glob.glob(os.path.expanduser(spec), recursive=True)
        found = sorted(pathlib.Path(p) for p in matches if os.path.isfile(p) and _is_image_name(p))
        where = f"glob {spec!r}"
    else:
        raise InputError(f"predict.input={spec}: no such file or folder")
    if not found:
        raise InputError(
            f"predict.input: no images in {where} (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return found


def _is_image_name(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(IMAGE_SUFFIXES)


def output_names(paths: Sequence[pathlib.Path]) -> list[str]:
    """One file-name stem per input: the file's stem, or its path parts where stems repeat."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    root = pathlib.Path(os.path.commonpath([p.resolve().parent for p in paths]))
    names = []
    for p in paths:
        rel = p.resolve().relative_to(root).with_suffix("")
        names.append("__".join(rel.parts))
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # Same stem and folder, different suffix: a.jpg and a.png.
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def load_segmentor(
    config: ml_collections.ConfigDict, workdir: str, *, allow_random: bool = False
) -> Segmentor:
    """The workdir's latest checkpoint, else `init_from`; else random init if `allow_random`.

    Without weights and without `allow_random`, raises InputError with one line.
    """
    if config.model.classifier == "gt":
        raise InputError("model.classifier='gt' needs ground-truth labels; predict cannot run it")
    try:
        return Segmentor.from_workdir(config, workdir)
    except CheckpointNotFoundError as err:
        if not allow_random:
            raise InputError(f"predict: {err}") from None
    print(
        f"WARNING: no checkpoint in {workdir} and no init_from: predicting with the model's "
        f"seeded random initialisation (seed {config.seed}); the pictures show an untrained "
        "model. Train first or set --config.init_from=PATH.",
        file=sys.stderr,
    )
    segmentor = Segmentor.from_config(config)
    segmentor.weights = f"(random init, seed {config.seed})"
    return segmentor


def demo_inputs(config: ml_collections.ConfigDict, folder: str | os.PathLike) -> list[str]:
    """Write DEMO_IMAGES generated validation images (the first ones of the generated
    dataset with the config's `data.synthetic_val_seed`) as JPEGs into `folder`."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(DEMO_IMAGES):
        image, _ = synthetic.make_example(int(config.data.synthetic_val_seed), 1, i, 128, 256)
        path = folder / f"ADE_val_{i + 1:08d}.jpg"
        if not cv2.imwrite(str(path), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise InputError(f"cannot write the demo image {path}")
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------
# One image.


@dataclasses.dataclass
class ImagePrediction:
    """labels (H, W) int32; scores (n_cls,) float32 image-level class scores (see
    `score_kind`); selected (n_cls,) bool, the classes some window's top-k kept (RankSeg)."""

    labels: np.ndarray
    scores: np.ndarray
    score_kind: str
    selected: np.ndarray | None
    windows: int


class Predictor:
    """A Segmentor plus the image-level class scores that the pictures rank.

    The label map is the config's test inference (as `Segmentor.predict`: rescale, sliding
    windows, scales, flip). The image-level scores come from the same model calls, on the
    windows of the unflipped scale-1.0 pass: RankSeg's sigmoid class scores, max over windows
    (a class anywhere in the image ranks high); for the mask head (no image-level classifier)
    the mean softmax probability of the window pixels, averaged over windows.
    """

    def __init__(self, segmentor: Segmentor) -> None:
        if segmentor.config.model.classifier == "gt":
            raise InputError("model.classifier='gt' needs ground-truth labels to predict")
        self.segmentor = segmentor
        self.config = segmentor.config
        self.settings, self.kwargs = inference.settings_from_config(self.config)
        self.rankseg = self.config.model.classifier == "rankseg"
        self.score_kind = (
            "RankSeg image-level score (sigmoid, max over windows)"
            if self.rankseg
            else "mean pixel probability (no image-level classifier)"
        )
        model = segmentor.model
        forward = lambda variables, windows: model.apply(
            variables, windows, method=model.encode_decode_with_scores
        )
        # The label map and the scores come from one model call per window.
        self.inferencer = inference.Inferencer(
            forward, segmentor.variables, self.config.model.n_cls, self.settings,
            ignore_index=self.config.data.ignore_index,
        )  # fmt: skip

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._labels()[0]

    @property
    def palette(self) -> np.ndarray:
        return self._labels()[1]

    def _labels(self) -> tuple[tuple[str, ...], np.ndarray]:
        return visualize.dataset_labels(self.config.data.dataset, self.config.model.n_cls)

    def passes(self, image: np.ndarray) -> list[tuple[np.ndarray, bool]]:
        """The normalised (image, flipped) passes of the config's test pipeline."""
        kw = self.kwargs
        return inference.image_passes(
            image, mean=kw["mean"], std=kw["std"], test_scale=kw["test_scale"],
            ratios=kw["ratios"], flip=kw["flip"],
        )  # fmt: skip

    def image_scores(self, window_scores: list[np.ndarray]) -> np.ndarray:
        """Image-level class scores (n_cls,) float32 from the per-pass window scores of the
        unflipped scale-1.0 pass: max over windows (RankSeg), else the mean."""
        ratios = list(self.kwargs["ratios"])
        index = ratios.index(1.0) if 1.0 in ratios else 0
        per_window = window_scores[index * (2 if self.kwargs["flip"] else 1)]
        agg = per_window.max(axis=0) if self.rankseg else per_window.mean(axis=0)
        return agg.astype(np.float32)

    def __call__(self, image: np.ndarray) -> ImagePrediction:
        """Predict one raw uint8 RGB image (H, W, 3)."""
        image = check_image(image)
        done = self.inferencer.predict_passes(self.passes(image), image.shape[:2])
        scores = self.image_scores(done.window_scores)
        return ImagePrediction(done.pred, scores, self.score_kind, done.selected, done.windows)

    def top_classes(self, scores: np.ndarray) -> np.ndarray:
        """The ids of the JSON's top-k list: model.k for RankSeg, else at most 20."""
        k = self.config.model.k if self.rankseg else min(JSON_TOPK_NO_RANKSEG, len(scores))
        return np.argsort(-scores, kind="stable")[:k]


# ------------------------------------------------------------------------------------------
# Outputs of one image.


def label_png(labels: np.ndarray, n_cls: int, submission_format: bool = False) -> np.ndarray:
    """The label map as stored: uint8 ids, uint16 when an id can exceed 255; ADE submission
    format (id + 1, 0 = "other") when asked."""
    values = labels.astype(np.int64) + (1 if submission_format else 0)
    top = n_cls if submission_format else n_cls - 1
    return values.astype(np.uint8 if top <= 255 else np.uint16)


def prediction_record(
    predictor: Predictor, pred: ImagePrediction, source: str, size: tuple[int, int]
) -> dict[str, Any]:
    """The per-image JSON: top-k classes with scores, pixel shares, RankSeg's selection."""
    names = predictor.class_names
    shares = visualize.class_shares(pred.labels)
    present = {cls for cls, _, _ in shares}
    topk = [
        {
            "rank": rank + 1,
            "id": int(cls),
            "name": names[cls],
            "score": float(pred.scores[cls]),
            "predicted": int(cls) in present,
        }
        for rank, cls in enumerate(predictor.top_classes(pred.scores))
    ]
    record: dict[str, Any] = {
        "image": source,
        "height": int(size[0]),
        "width": int(size[1]),
        "weights": predictor.segmentor.weights,
        "head": predictor.config.model.classifier,
        "score_kind": pred.score_kind,
        "topk": topk,
        "classes": [
            {"id": cls, "name": names[cls], "pixels": pixels, "share": share}
            for cls, pixels, share in shares
        ],
        "windows": int(pred.windows),
    }
    if pred.selected is not None and predictor.rankseg:
        record["selected"] = [int(c) for c in np.flatnonzero(pred.selected)]
    return record


@dataclasses.dataclass
class PredictReport:
    """What a predict run wrote (names → files) and what it skipped (path → reason)."""

    output: pathlib.Path
    written: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    contact_sheet: str | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.written else 1


def _write_image_outputs(
    predictor: Predictor,
    out: pathlib.Path,
    name: str,
    source: str,
    image: np.ndarray,
    pred: ImagePrediction,
    *,
    figures: bool,
    submission_format: bool,
    gt: np.ndarray | None = None,
) -> tuple[dict[str, str], np.ndarray]:
    names, palette = predictor.class_names, predictor.palette
    n_cls = predictor.config.model.n_cls
    files = {kind: str(out / kind / f"{name}.png") for kind in ("labels", "color", "overlay")}
    files["json"] = str(out / "json" / f"{name}.json")
    visualize.write_png(files["labels"], label_png(pred.labels, n_cls, submission_format))
    visualize.write_png(files["color"], visualize.colorize(pred.labels, palette))
    overlay = visualize.overlay_with_legend(image, pred.labels, names, palette)
    visualize.write_png(files["overlay"], overlay)
    record = prediction_record(predictor, pred, source, image.shape[:2])
    pathlib.Path(files["json"]).write_text(json.dumps(record, indent=1) + "\n")
    if figures:
        files["figure"] = str(out / "figures" / f"{name}.png")
        fig = visualize.ranking_figure(
            image, pred.labels, pred.scores, names, palette,
            topk=min(FIGURE_TOPK, len(pred.scores)), score_label=pred.score_kind, title=name,
            gt=gt, ignore_index=int(predictor.config.data.ignore_index),
        )  # fmt: skip
        visualize.save_figure(fig, files["figure"])
    return files, overlay


def _warn(message: str, progress: bool) -> None:
    """A line on stderr that does not break the progress bar."""
    if progress:
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _thumbnail(picture: np.ndarray, side: int = 256) -> np.ndarray:

    h, w = picture.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return picture
    return cv2.resize(picture, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)  # fmt: skip


def predict_files(
    predictor: Predictor,
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    figures: bool = True,
    submission_format: bool = False,
    progress: bool = True,
    labels: Sequence[np.ndarray | None] | None = None,
) -> PredictReport:
    """Predict every image file and write its outputs under `output` (see the module doc).

    Unreadable images are reported on stderr by name and skipped. `labels` (optional, one
    per path) are ground-truth maps drawn in the figures (the notebook's evaluation images).
    """
    paths = [pathlib.Path(p) for p in paths]
    out = pathlib.Path(output)
    for sub in SUBDIRS if figures else SUBDIRS[:-1]:
        (out / sub).mkdir(parents=True, exist_ok=True)
    report = PredictReport(out)
    thumbs = []
    stream = zip(paths, output_names(paths), labels or [None] * len(paths), strict=True)
    if progress:
        stream = tqdm(stream, total=len(paths), desc="predict", unit="img")
    for path, name, gt in stream:
        try:
            image = imageio.read_image(path)
        except DatasetError as err:
            report.failed[str(path)] = str(err)
            _warn(f"skipped: {err}", progress)
            continue
        pred = predictor(image)
        files, overlay = _write_image_outputs(
            predictor, out, name, str(path), image, pred,
            figures=figures, submission_format=submission_format, gt=gt,
        )  # fmt: skip
        report.written[name] = files
        if len(thumbs) < CONTACT_SHEET_MAX:
            thumbs.append((name, _thumbnail(overlay)))
    if figures and len(thumbs) > 1:
        report.contact_sheet = str(out / "contact_sheet.png")
        visualize.save_figure(visualize.contact_sheet(thumbs), report.contact_sheet)
    _write_summary(predictor, report, submission_format)
    return report


def _write_summary(predictor: Predictor, report: PredictReport, submission_format: bool) -> None:
    summary = {
        "weights": predictor.segmentor.weights,
        "dataset": predictor.config.data.dataset,
        "n_cls": predictor.config.model.n_cls,
        "head": predictor.config.model.classifier,
        "label_format": "ADE submission (id + 1)" if submission_format else "class id",
        "written": report.written,
        "failed": report.failed,
        "contact_sheet": report.contact_sheet,
    }
    (report.output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
