"""`--mode=eval`: evaluate the workdir's latest checkpoint (else init_from) on the val split.

Results go where rankseg_jax.evaluation writes them (JSON, table, TensorBoard). A missing or
unreadable dataset or checkpoint, or a corrupt example (unless `data.skip_corrupt`), raises a
UserError (one line, exit 2 from main.py).
"""

from __future__ import annotations

import ml_collections

from rankseg_jax import evaluation
from rankseg_jax.data.sources import source_from_config
from rankseg_jax.errors import CorruptDataError
from rankseg_jax.segmentor import Segmentor


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Evaluate and write the results; returns 0."""
    source = source_from_config(config, "val")
    segmentor = Segmentor.from_workdir(config, workdir)
    step = segmentor.step or 0
    print(
        f"evaluating {segmentor.weights} (step {step}, {segmentor.num_params:,} parameters) on "
        f"{config.data.dataset} {source.split}: {len(source)} images"
    )
    writer = evaluation.create_writer(workdir)
    extra = {
        "weights": str(segmentor.weights),
        "dataset": config.data.dataset,
        "split": source.split,
        "inference": evaluation.inference_settings(config),
    }
    try:
        evaluation.run_evaluation(
            segmentor, config, source, step=step, writer=writer, workdir=workdir, extra=extra
        )
    except CorruptDataError as err:
        raise CorruptDataError(f"{err} (data.skip_corrupt=True skips unreadable examples)") from err
    finally:
        writer.close()
    return 0
