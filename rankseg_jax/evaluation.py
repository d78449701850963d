"""`main.py --mode=eval`, and the evaluation the training loop runs every `eval.every_steps`.

`eval_command(config, workdir)`: weights as `Segmentor.from_workdir` finds them (the workdir's
latest checkpoint, else `config.init_from`), the config's val split read by the dataset reader
(the demo dataset is generated first when missing), the config's test inference (slide or
whole, `eval.scales`, `eval.flip`, `eval.max_images`), then

    <workdir>/eval/results_step<N>.json   everything, NaN written as null
    <workdir>/eval/table_step<N>.txt      per-class IoU/Acc table, summary, top-k ceilings
    TensorBoard events in <workdir>       eval/mIoU, eval/aAcc, eval/mAcc, eval/IoU/<class>,
                                          eval/pixel_recall, eval/image_recall, eval/time_s,
                                          eval/windows_per_s, eval/images_per_s, the table

where N is the checkpoint step (0 for `init_from` weights). A missing dataset or checkpoint is
one error line and exit code 2.

`run_evaluation(evaluator, config, source, ...)` is the reusable part: the training loop builds
an Inferencer once (`Segmentor(config, model, params).inferencer`, so the model compiles once
for the whole run) and passes it with the current `params` at every evaluation.

Multi-process: each process scores its share of the images (the pipeline's `eval_batches`
splits them); the int64 counts and the top-k sums are summed over processes
(`sum_over_processes`) before the scores are computed, and only process 0 writes files.
"""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rankseg_jax import inference, metrics
from rankseg_jax.data import pipeline
from rankseg_jax.errors import DatasetError

RESULTS_DIR = "eval"


class ArraySource:
    """Examples held in memory as a dataset source (benchmarks, notebooks, tests).

    examples: (image (H, W, 3) uint8 RGB, label (H, W) int class ids) pairs; `source[i]` is
    the reader's dict {"image", "label", "name"}.
    """

    def __init__(self, examples: Sequence[tuple[np.ndarray, np.ndarray]], class_names=None):
        self.examples = list(examples)
        self.class_names = tuple(class_names or ())

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.examples[int(index)]
        return {"image": image, "label": np.asarray(label, np.int32), "name": str(int(index))}


def results_path(workdir: str | pathlib.Path, step: int) -> pathlib.Path:
    """Where the results JSON of `step` goes: <workdir>/eval/results_step<step>.json."""
    return pathlib.Path(workdir) / RESULTS_DIR / f"results_step{step}.json"


def table_path(workdir: str | pathlib.Path, step: int) -> pathlib.Path:
    return pathlib.Path(workdir) / RESULTS_DIR / f"table_step{step}.txt"


# ------------------------------------------------------------------------------------------
# TensorBoard.


def hide_gpus_from_tensorflow() -> None:
    """Keep TensorFlow (imported by clu's writers) off the accelerators JAX uses.

    TensorFlow would otherwise reserve most of the GPU memory when it first initialises.
    Must run before TensorFlow touches its devices; later calls do nothing.
    """
    try:  # tensorflow is heavy and optional here: imported only to hide the GPUs from it
        import tensorflow as tf
    except ImportError:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised, or no GPU support
        pass


def create_writer(workdir: str | pathlib.Path):
    """clu's default writer (TensorBoard on process 0, logging elsewhere), TF kept off GPUs."""
    hide_gpus_from_tensorflow()
    from clu import metric_writers  # imports TensorFlow: only after the GPUs are hidden

    return metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0, asynchronous=False
    )


def _tag(name: str) -> str:
    """A TensorBoard-friendly tag for a class name ("chest of drawers, chest" -> chest_of_...)."""
    return re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_") or "class"


def scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of a result: percentages, per-class IoU, ceilings, speed.

    NaN values (classes absent from the evaluated images) are left out.
    """
    out = {f"eval/{key}": metrics.percent(results[key]) for key in ("mIoU", "aAcc", "mAcc")}
    names = results["class_names"]
    for index, (name, iou) in enumerate(zip(names, results["IoU"], strict=True)):
        out[f"eval/IoU/{index:03d}_{_tag(name)}"] = metrics.percent(iou)
    topk = results.get("topk")
    if topk:
        out["eval/pixel_recall"] = metrics.percent(topk["pixel_recall"])
        out["eval/image_recall"] = metrics.percent(topk["image_recall"])
        out["eval/mean_selected"] = topk["mean_selected"]
    out["eval/time_s"] = results["eval_time_s"]
    out["eval/windows_per_s"] = results["windows_per_s"]
    out["eval/images_per_s"] = results["images_per_s"]
    return {k: float(v) for k, v in out.items() if not math.isnan(float(v))}


# ------------------------------------------------------------------------------------------
# Multi-process sums.


def sum_over_processes(values: np.ndarray) -> np.ndarray:
    """Sum an int64 or float64 array over all processes (itself with one process).

    Sent as uint32 words, since JAX without x64 has no 64-bit arrays.
    """
    values = np.ascontiguousarray(values)
    if jax.process_count() == 1:
        return values

    words = values.reshape(-1).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(words), np.uint32)
    parts = np.ascontiguousarray(gathered).view(values.dtype)
    return parts.reshape((-1, *values.shape)).sum(axis=0)


def _topk_sums(recall: metrics.TopkRecall) -> np.ndarray:
    return np.array(
        [
            sum(recall.pixel),
            sum(recall.image),
            len(recall.pixel),
            sum(recall.num_selected),
            len(recall.num_selected),
        ],
        np.float64,
    )


def _topk_from_sums(sums: np.ndarray) -> dict[str, float]:
    pixel, image, valid, selected, images = (float(v) for v in sums)
    return {
        "pixel_recall": pixel / valid if valid else math.nan,
        "image_recall": image / valid if valid else math.nan,
        "mean_selected": selected / images if images else math.nan,
        "num_images": int(valid),
    }


def merged_result(scorer: inference.Scorer) -> dict[str, Any]:
    """The scorer's result with counts and ceilings summed over all processes."""
    if jax.process_count() == 1:
        return scorer.result()
    meter = scorer.meter
    meter.counts = sum_over_processes(meter.counts)
    meter.num_images = int(sum_over_processes(np.array([meter.num_images], np.int64))[0])
    windows = int(sum_over_processes(np.array([scorer.windows], np.int64))[0])
    results = scorer.result()
    results["windows"] = windows
    seconds = results["eval_time_s"]
    results["windows_per_s"] = windows / seconds if seconds else math.nan
    results["images_per_s"] = meter.num_images / seconds if seconds else math.nan
    if scorer.recall is not None:
        results["topk"] = _topk_from_sums(sum_over_processes(_topk_sums(scorer.recall)))
    return results


# ------------------------------------------------------------------------------------------
# Evaluation.


def _inferencer_of(evaluator: Any) -> inference.Inferencer:
    if isinstance(evaluator, inference.Inferencer):
        return evaluator
    inferencer = getattr(evaluator, "inferencer", None)
    if isinstance(inferencer, inference.Inferencer):
        return inferencer
    raise TypeError(
        f"run_evaluation needs a Segmentor or an inference.Inferencer, got {type(evaluator)}"
    )


def local_image_count(num_examples: int, max_images: int = 0) -> int:
    """How many real images this process evaluates (the pipeline's split, batch size 1)."""
    total = min(num_examples, max_images) if max_images > 0 else num_examples
    return len(range(jax.process_index(), total, jax.process_count()))


def run_evaluation(
    evaluator: Any,
    config: ml_collections.ConfigDict,
    source: Any,
    *,
    params: Any = None,
    step: int = 0,
    writer: Any = None,
    workdir: str | pathlib.Path | None = None,
    progress: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate on `source` (a dataset reader) with the config's test inference; all processes.

    evaluator: a `Segmentor` or an `inference.Inferencer` (reuse one across evaluations so the
    model compiles once); params: new variables to evaluate (training: {"params", **model_state}
    as `Segmentor.variables`), else its own.
    The images come through the eval pipeline (`data.num_workers` workers, keep-ratio resize
    to `data.test_scale` and the `eval.scales` ratios, normalisation), flips per `eval.flip`,
    the first `eval.max_images` only when > 0. Returns `inference.Scorer.result()` summed over
    processes, plus step, per_class (percent), the dataset's int64 pixel `counts`
    (intersection, prediction, label per class, so runs can be merged) and `extra`. With
    `writer` the scalars and the table go to TensorBoard at `step`; with `workdir` process 0
    writes the JSON and the table (`results_path`, `table_path`) and prints the table.
    """
    inferencer = _inferencer_of(evaluator)
    if params is not None:
        inferencer.params = params
    _, settings = inference.settings_from_config(config)
    max_images = settings["max_images"]
    batches = pipeline.eval_batches(
        source, pipeline.PipelineConfig.from_config(config), max_examples=max_images
    )
    class_names = list(getattr(source, "class_names", ()) or ()) or None
    if class_names is not None and len(class_names) != inferencer.n_cls:
        raise DatasetError(
            f"the dataset has {len(class_names)} classes but model.n_cls={inferencer.n_cls}"
        )
    scorer = inference.Scorer(inferencer, class_names)
    jobs = inference.batch_jobs(inferencer, batches, flip=settings["flip"])
    show = progress and jax.process_index() == 0
    scorer.consume(jobs, progress=show, total=local_image_count(len(source), max_images))
    results = merged_result(scorer)
    results["step"] = int(step)
    counts = scorer.meter.counts
    results["counts"] = {
        name: [int(v) for v in counts[row]]
        for name, row in (("intersection", 0), ("prediction", 1), ("label", 2))
    }
    per_class = zip(results["class_names"], results["IoU"], results["Acc"], strict=True)
    results["per_class"] = {
        name: {"IoU": metrics.percent(iou), "Acc": metrics.percent(acc)}
        for name, iou, acc in per_class
    }
    results.update(extra or {})
    table = format_report(results)
    if writer is not None:
        writer.write_scalars(step, scalars(results))
        writer.write_texts(step, {"eval/table": "```\n" + table + "\n```"})
        writer.flush()
    if workdir is not None and jax.process_index() == 0:
        metrics.write_json(results, results_path(workdir, step))
        path = table_path(workdir, step)
        path.write_text(table + "\n")
        print(table)
        logging.info("eval results written to %s", results_path(workdir, step))
    return results


def format_report(results: Mapping[str, Any]) -> str:
    """The per-class table, the summary line, the top-k ceilings and the speed, as text."""
    lines = [metrics.format_table(results)]
    topk = results.get("topk")
    if topk:
        lines.append(
            "top-k ceilings: pixel recall {:.2f}  image recall {:.2f}  "
            "({:.1f} classes per image)".format(
                metrics.percent(topk["pixel_recall"]),
                metrics.percent(topk["image_recall"]),
                topk["mean_selected"],
            )
        )
    lines.append(
        "{} images, {} windows in {:.1f} s ({:.1f} windows/s), {} compilations".format(
            results["num_images"],
            results["windows"],
            results["eval_time_s"],
            results["windows_per_s"],
            results["compilations"],
        )
    )
    header = []
    if "weights" in results:
        header.append(f"weights: {results['weights']} (step {results.get('step', 0)})")
    if "dataset" in results:
        header.append(f"dataset: {results['dataset']} {results.get('split', '')}")
    return "\n".join(header + lines)


def inference_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The test-time settings recorded with the results."""
    return {
        "mode": config.eval.mode,
        "crop": list(config.eval.crop),
        "stride": list(config.eval.stride),
        "scales": list(config.eval.scales),
        "flip": bool(config.eval.flip),
        "test_scale": list(config.data.test_scale),
        "max_images": int(config.eval.max_images),
    }
