"""The command line: `python main.py ...` and `python -m rankseg_jax ...` both call `run()`.

`--config=configs/demo.py --workdir=DIR [--mode=...]`. Kept short on purpose: parse flags, load
and validate the config, optional jax.distributed, dispatch to
`rankseg_jax.modes.<mode>.run(config, workdir)`. User errors (every subclass of
rankseg_jax.errors.UserError) become one `error: ...` line on stderr and exit status 2, here
and nowhere else.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rankseg_jax import config as config_lib
from rankseg_jax import distributed, evaluation
from rankseg_jax.errors import ConfigError, UserError
from rankseg_jax.modes import evaluate, export, predict, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.DEFINE_enum("mode", None, list(config_lib.MODES), "Overrides config.mode.")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize().")
flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (else $JAX_COORDINATOR_ADDRESS)."
)
flags.DEFINE_integer("num_processes", None, "Processes in the job (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (else $JAX_PROCESS_ID).")

MODES = {"train": train.run, "eval": evaluate.run, "predict": predict.run, "export": export.run}
_PARSE_ERRORS: list[UserError] = []  # raised again inside main()'s one catch


def parse_flags(argv: list[str]) -> list[str]:
    """Load the recipe of `--config=path.py[:arg]` (rankseg_jax.config), then parse the flags,
    `--config.key=value` overrides included. Errors are kept for main() to report."""
    try:
        specs = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
        if len(specs) != 1:
            raise ConfigError("give exactly one --config=path/to/recipe.py[:arg]")
        recipe = config_lib.load_config(specs[0])
        rest = [a for a in argv if not a.startswith("--config=")]
        config_flags.DEFINE_config_dict("config", recipe, sys_argv=rest)
        FLAGS(rest)
        if FLAGS.workdir is None:
            raise ConfigError("--workdir=DIR is required")
        return rest
    except UserError as exc:
        _PARSE_ERRORS.append(exc)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as exc:
        cause = exc.__cause__ or exc
        text = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
        _PARSE_ERRORS.append(ConfigError(" ".join(str(text).split())))
    FLAGS.mark_as_parsed()  # absl reads its own flags before main(); the defaults will do
    return argv[:1]


def main(argv: list[str]) -> int:
    del argv
    if _PARSE_ERRORS:
        print(f"error: {_PARSE_ERRORS[0]}", file=sys.stderr)
        return 2
    launch = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    return run_mode(FLAGS.config, FLAGS.mode, FLAGS.workdir, FLAGS.distributed, launch)


def run_mode(config, mode: str | None, workdir: str, distributed_mode: str = "off",
             launch: tuple = (None, None, None)) -> int:  # fmt: skip
    """Validate `config` and run `mode` (None: config.mode) in `workdir`: the exit status.

    The one place a UserError becomes one `error: ...` line on stderr and status 2 (main()
    calls it after parsing the flags; tests call it in-process).
    """
    try:
        mode = mode or config.mode
        config_lib.validate(config)
        if mode in ("train", "eval"):  # clu's writers import TensorFlow: keep it off the GPUs
            evaluation.hide_gpus_from_tensorflow()
        logging.info(distributed.maybe_initialize(distributed_mode, *launch))  # before other JAX
        logging.info("mode=%s workdir=%s", mode, workdir)
        return MODES[mode](config, workdir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run() -> None:
    """Parse the flags and run the mode; exits with its status (0, 2 for user errors)."""
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
