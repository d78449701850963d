"""`--mode=predict`: label maps, overlays, class rankings and figures (see rankseg_jax.predict).

`predict.input` may name video files (rankseg_jax.video.VIDEO_SUFFIXES, alone or among the
images of a folder or glob): each gives `<output>/video/<stem>_overlay.mp4` (same frame rate
and size, the dataset's palette and a legend) and `<output>/video/<stem>.jsonl` (one line per
frame: top-k classes with names and scores, pixel shares), frames streamed in fixed-size
batches with a frames/s progress bar.

Exit status 0 when some image or video was written, 1 when none was; a bad input path,
missing weights or an unreadable video raise a UserError (exit 2 from main.py).
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

from rankseg_jax import predict, video

VIDEO_BATCH = 8  # decoded frames alive at once: memory does not grow with the video's length


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Predict the images of `predict.input` (else demo images); returns the exit status."""
    spec = config.predict.input
    output = pathlib.Path(config.predict.output or os.path.join(workdir, "predict"))
    if spec:
        paths = predict.find_images(spec)
    else:
        paths = predict.demo_inputs(config, output / "inputs")
        print(f"no predict.input: predicting {len(paths)} generated images ({output}/inputs)")
    videos = [p for p in paths if video.is_video(p)]
    paths = [p for p in paths if not video.is_video(p)]
    for path in videos:  # an unreadable video stops here: one line, before any model work
        video.probe(path)
    predictor = predict.Predictor(predict.load_segmentor(config, workdir, allow_random=not spec))
    print(f"weights {predictor.segmentor.weights}, {predictor.segmentor.num_params:,} parameters")
    for path in videos:
        done = video.predict_video(
            path, video.from_predictor(predictor), output / "video", predictor.class_names,
            predictor.palette, batch_size=VIDEO_BATCH, topk=predictor.topk,
        )  # fmt: skip
        print(
            f"video {path}: {done.frames} frames ({done.frames_per_second:.1f} frames/s) -> "
            f"{done.overlay}, {done.jsonl}"
        )
    if not paths:
        return 0 if videos else 1
    report = predict.predict_files(
        predictor, paths, output,
        figures=bool(config.predict.figures),
        submission_format=bool(config.predict.submission_format),
    )  # fmt: skip
    print(f"wrote {len(report.written)} of {len(paths)} images to {output}")
    if report.failed:
        print(f"skipped {len(report.failed)} unreadable: {', '.join(report.failed)}")
    return report.exit_code
