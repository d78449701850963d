"""Multi-process start-up: `jax.distributed.initialize()` with explicit or detected settings.

It must run before any other JAX call. A cluster is joined when the launch says so: the flags
`--coordinator_address` / `--num_processes` / `--process_id` (or the environment variables
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; a flag wins over its variable)
are passed to `jax.distributed.initialize`, and whatever is not given is left to JAX's own
cluster detection (SLURM, OpenMPI, TPU pods fill in all three). `--distributed=auto` joins a
cluster only when one is given or detected, `on` always, `off` never.

On the CPU platform a multi-process run needs cross-process collectives; they are chosen before
the backend starts (gloo), so two processes on one machine work without extra settings. When
joining was asked for and fails, the run stops: a process that trained alone would write into
a shared workdir.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

from rankseg_jax.errors import UserError

CLUSTER_HINTS = {
    "JAX_COORDINATOR_ADDRESS": "JAX_COORDINATOR_ADDRESS is set",
    "TPU_WORKER_HOSTNAMES": "a TPU pod (TPU_WORKER_HOSTNAMES)",
    "MEGASCALE_COORDINATOR_ADDRESS": "a multi-slice TPU job",
}
ENV_NAMES = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
# The CPU collectives a multi-process CPU run uses (the default of jax 0.10.2; older jax: "none").
CPU_COLLECTIVES = "gloo"


class DistributedError(UserError, ValueError):
    """A launch problem the user fixes (bad flag or variable, cluster not reachable)."""


class DistributedConfigError(DistributedError):
    """A launch flag or JAX_* variable has a value that cannot be right."""


class DistributedInitError(DistributedError):
    """jax.distributed.initialize() was required and failed."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """The explicit part of a launch; None = not given (JAX's cluster detection decides)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))

    def kwargs(self) -> dict[str, str | int]:
        """The given settings as `jax.distributed.initialize` keyword arguments."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def resolve_launch(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Launch:
    """Flags (None/"" = not given) over JAX_* variables, checked; DistributedConfigError if bad."""
    env = os.environ if env is None else env
    given = dict(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    values: dict[str, str | int | None] = {}
    for key, value in given.items():
        source = f"--{key}"
        if value is None or value == "":
            value, source = env.get(ENV_NAMES[key], "").strip() or None, ENV_NAMES[key]
        if value is not None and key != "coordinator_address":
            value = _integer(value, source, minimum=1 if key == "num_processes" else 0)
        values[key] = value
    launch = Launch(**values)
    if launch.coordinator_address is not None:
        _check_address(launch.coordinator_address)
    n, i = launch.num_processes, launch.process_id
    if n is not None and i is not None and i >= n:
        raise DistributedConfigError(
            f"process_id={i} with num_processes={n}: process ids are 0 … {n - 1}"
        )
    if n is not None and n > 1 and launch.coordinator_address is None and not detect_cluster(env):
        raise DistributedConfigError(
            f"num_processes={n} needs --coordinator_address=HOST:PORT (process 0's host and a "
            "free port, the same on every process) or JAX_COORDINATOR_ADDRESS"
        )
    return launch


def _integer(value: str | int, source: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DistributedConfigError(f"{source}={value!r}: expected an integer") from None
    if number < minimum:
        raise DistributedConfigError(f"{source}={number}: must be ≥ {minimum}")
    return number


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(
            f"coordinator address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:1234)"
        )


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
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


def _several_in(env: Mapping[str, str], name: str) -> bool:
    try:
        return int(env.get(name, "1")) > 1
    except ValueError:
        return False


def maybe_initialize(
    mode: str,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Join the cluster per `mode` (auto|on|off) and the launch settings; returns what was done.

    Raises DistributedConfigError for bad settings, DistributedInitError when joining fails.
    """
    if mode not in ("auto", "on", "off"):
        raise DistributedConfigError(f"--distributed={mode!r}: auto, on or off")
    launch = resolve_launch(coordinator_address, num_processes, process_id, env)
    if mode == "off":
        if launch.num_processes is not None and launch.num_processes > 1:
            raise DistributedConfigError(
                f"--distributed=off with num_processes={launch.num_processes}: drop one of them"
            )
        return "off"
    if launch.num_processes == 1:
        return "single process (num_processes=1)"
    if mode == "on":
        reason = "asked for"
    elif launch.explicit:
        reason = "launch settings given"
    else:
        reason = detect_cluster(env)
    if reason is None:
        return "single process (no cluster detected)"
    # Must precede backend creation; only the CPU backend reads it, so GPU/TPU runs are unchanged.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    try:
        jax.distributed.initialize(**launch.kwargs())
    except Exception as exc:  # noqa: BLE001 - any failure must stop the run
        message = " ".join(str(exc).split())[:300]
        raise DistributedInitError(
            f"jax.distributed.initialize({_describe(launch)}) failed ({reason}): {message}; "
            "refusing to train alone into a shared workdir (use --distributed=off to override)"
        ) from exc
    return f"jax.distributed initialised ({reason}): process {jax.process_index()} of " + str(
        jax.process_count()
    )


def _describe(launch: Launch) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in launch.kwargs().items())
