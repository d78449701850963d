"""Multi-host start-up: `jax.distributed.initialize()` where a cluster is detected.

It must run before any other JAX call. `--distributed=auto` initialises only when the
environment shows a cluster (TPU pod, SLURM or OpenMPI job of several tasks, or an explicit
JAX_COORDINATOR_ADDRESS); `on` always; `off` never. When initialisation is asked for and fails,
the run stops: a process that trained alone would write into a shared workdir.
"""

from __future__ import annotations

import os

import jax

from rankseg_jax.errors import UserError

CLUSTER_HINTS = {
    "JAX_COORDINATOR_ADDRESS": "JAX_COORDINATOR_ADDRESS is set",
    "TPU_WORKER_HOSTNAMES": "a TPU pod (TPU_WORKER_HOSTNAMES)",
    "MEGASCALE_COORDINATOR_ADDRESS": "a multi-slice TPU job",
}


def detect_cluster(env: dict | None = None) -> str | None:
    """Why this process looks like one of several (None on a plain machine)."""
    env = os.environ if env is None else env
    for name, why in CLUSTER_HINTS.items():
        if env.get(name, "").strip() and (name != "TPU_WORKER_HOSTNAMES" or "," in env[name]):
            return why
    if "SLURM_JOB_ID" in env and _several_in(env, "SLURM_NTASKS"):
        return "a SLURM job of several tasks"
    if _several_in(env, "OMPI_COMM_WORLD_SIZE"):
        return "an OpenMPI job of several ranks"
    return None


def _several_in(env, name: str) -> bool:
    try:
        return int(env.get(name, "1")) > 1
    except ValueError:
        return False


def maybe_initialize(mode: str) -> str:
    """Initialise jax.distributed per `mode` (auto|on|off); returns what was done."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed={mode!r}: auto, on or off")
    reason = detect_cluster() if mode == "auto" else ("asked for" if mode == "on" else None)
    if reason is None:
        return "single process (no cluster detected)" if mode == "auto" else "off"

    try:
        jax.distributed.initialize()
    except Exception as exc:  # noqa: BLE001 - any failure must stop the run
        raise UserError(
            f"jax.distributed.initialize() failed ({reason}): {exc}; "
            "refusing to train alone into a shared workdir (use --distributed=off to override)"
        ) from exc
    return f"jax.distributed initialised ({reason}): process {jax.process_index()} of " + str(
        jax.process_count()
    )
