"""Regenerate docs/overlay.png and docs/ranking.png: the project's pictures on generated data.

    python docs/make_figures.py                  # the demo model's seeded random init
    python docs/make_figures.py --workdir DIR    # a trained demo model (DIR's latest checkpoint)

One validation image of the generated dataset (configs/demo.py's data), predicted with the
demo config's test inference, drawn by rankseg_jax.visualize exactly as `--mode=predict` and
the notebook draw it. Prints the caption to put under the pictures.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys

import numpy as np
from PIL import Image

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))

from rankseg_jax import predict, visualize  # noqa: E402
from rankseg_jax.config import load_config  # noqa: E402
from rankseg_jax.data import synthetic  # noqa: E402
from rankseg_jax.segmentor import Segmentor  # noqa: E402

INDEX = 3  # which generated validation image
MAX_BYTES = 200_000


def save_small_png(picture: np.ndarray, path: pathlib.Path) -> int:
    """Write RGB uint8 as PNG; quantise to 256 colours when that keeps it under MAX_BYTES."""
    image = Image.fromarray(picture)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > MAX_BYTES:
        buffer = io.BytesIO()
        image.quantize(256, dither=Image.Dither.NONE).save(buffer, format="PNG", optimize=True)
    path.write_bytes(buffer.getvalue())
    return buffer.tell()


def figure_pixels(fig) -> np.ndarray:
    buffer = io.BytesIO()
    visualize.save_figure(fig, buffer)
    return np.asarray(Image.open(buffer).convert("RGB"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="", help="a trained demo workdir (else random init)")
    parser.add_argument("--out", default=str(DOCS), help="where the PNGs go")
    args = parser.parse_args(argv)
    config = load_config("configs/demo.py")
    if args.workdir:
        segmentor = Segmentor.from_workdir(config, args.workdir)
        weights = f"the demo model trained in {args.workdir}"
    else:
        segmentor = Segmentor.from_config(config)
        weights = "the demo model's seeded random initialisation (untrained)"
    predictor = predict.Predictor(segmentor)
    image, raw = synthetic.make_example(config.data.synthetic_val_seed, 1, INDEX, 288, 320)
    gt = np.where(raw == 0, 255, raw.astype(np.int32) - 1)
    pred = predictor(image)
    names, palette = predictor.class_names, predictor.palette
    out = pathlib.Path(args.out)
    overlay = visualize.overlay_with_legend(image, pred.labels, names, palette)
    size_o = save_small_png(overlay, out / "overlay.png")
    fig = visualize.ranking_figure(
        image, pred.labels, pred.scores, names, palette, topk=predict.FIGURE_TOPK,
        score_label=pred.score_kind, gt=gt, ignore_index=255,
    )  # fmt: skip
    size_r = save_small_png(figure_pixels(fig), out / "ranking.png")
    print(f"wrote {out / 'overlay.png'} ({size_o:,} B) and {out / 'ranking.png'} ({size_r:,} B)")
    print(
        "Caption: a generated ADE20K-format validation image predicted by "
        f"{weights} (configs/demo.py, RankSeg head). Left: the overlay --mode=predict writes, "
        "with a legend of the predicted classes and their pixel shares. Right: image, "
        "prediction, ground truth and the image-level top-12 RankSeg class scores; coloured "
        "bold bars are classes the prediction contains, grey hatched bars ranked classes no "
        "pixel got, triangles mark classes in the ground truth."
    )


if __name__ == "__main__":
    main()
