"""The command line (`python main.py ...` and `python -m rankseg_jax ...` both run `run()`).

`python -m rankseg_jax --config=configs/demo.py --workdir=DIR [--mode=...]`. Kept short on
purpose: flags, logging, optional jax.distributed, then one call per mode.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.DEFINE_enum("mode", None, ["train", "eval", "predict", "export"], "Overrides config.mode.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize().")
flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (else $JAX_COORDINATOR_ADDRESS)."
)
flags.DEFINE_integer("num_processes", None, "Processes in the job (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (else $JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    del argv
    from rankseg_jax import distributed

    config = FLAGS.config
    mode = FLAGS.mode or config.mode
    if mode in ("train", "eval"):  # clu's writers import TensorFlow: keep it off the GPUs
        from rankseg_jax.eval_mode import hide_gpus_from_tensorflow

        hide_gpus_from_tensorflow()
    try:  # before any other JAX call
        logging.info(
            distributed.maybe_initialize(
                FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
            )
        )
    except distributed.DistributedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from configs import common
    from rankseg_jax import commands

    try:
        common.validate(config)
    except common.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.info("mode=%s workdir=%s", mode, FLAGS.workdir)
    return commands.run(mode, config, FLAGS.workdir)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors (unknown keys, bad args) as one line, exit 2."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, FileNotFoundError) as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        print(f"error: {cause if isinstance(exc, flags.Error) else exc}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """Parse the flags and run the mode; exits with its status (0, 2 for user errors)."""
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
