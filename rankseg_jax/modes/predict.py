"""`--mode=predict`: label maps, overlays, class rankings and figures (see rankseg_jax.predict).

Exit status 0 when some image was written, 1 when none was; a bad input path or missing
weights raise a UserError (exit 2 from main.py).
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

from rankseg_jax import predict


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Predict the images of `predict.input` (else demo images); returns the exit status."""
    spec = config.predict.input
    output = pathlib.Path(config.predict.output or os.path.join(workdir, "predict"))
    if spec:
        paths = predict.find_images(spec)
    else:
        paths = predict.demo_inputs(config, output / "inputs")
        print(f"no predict.input: predicting {len(paths)} generated images ({output}/inputs)")
    predictor = predict.Predictor(predict.load_segmentor(config, workdir, allow_random=not spec))
    print(f"weights {predictor.segmentor.weights}, {predictor.segmentor.num_params:,} parameters")
    report = predict.predict_files(
        predictor, paths, output,
        figures=bool(config.predict.figures),
        submission_format=bool(config.predict.submission_format),
    )  # fmt: skip
    print(f"wrote {len(report.written)} of {len(paths)} images to {output}")
    if report.failed:
        print(f"skipped {len(report.failed)} unreadable: {', '.join(report.failed)}")
    return report.exit_code
