"""`--mode=export`: the latest checkpoint of the workdir (else init_from) → PyTorch files.

The formats and layouts are rankseg_jax.convert.export's; this module is only the command.
"""

from __future__ import annotations

import jax
import ml_collections

from rankseg_jax import checkpoint
from rankseg_jax.convert.export import check_export_config, export_params, host_params, output_dir
from rankseg_jax.segmentor import Segmentor


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """`--mode=export`: latest checkpoint of `workdir` (else `init_from`) → PyTorch files.

    Returns 0; an unusable config or checkpoint raises a UserError.
    """
    check_export_config(config)
    segmentor = Segmentor.from_workdir(config, workdir)
    step = checkpoint.latest_step(workdir)
    output = output_dir(config, workdir)
    params = host_params(segmentor.params)
    model_state = host_params(segmentor.model_state)  # BN running statistics, if any
    if jax.process_index() != 0:
        return 0
    written = export_params(params, config, output, segmentor.weights, step, model_state)
    print(f"exported {segmentor.weights} ({segmentor.num_params:,} parameters):")
    for path in written:
        print(f"  {path}")
    return 0
