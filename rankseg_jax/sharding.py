"""Mesh and batch-sharding helpers: a ('data', 'fsdp') mesh and the batch split over both axes.

Kept small on purpose; the scale-out work extends it (parameter sharding rules, FSDP).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
    """A mesh shape or batch size that does not fit the devices; the message says why."""


def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
    """Resolve (data, fsdp) sizes where one of them may be -1 ("the rest of the devices")."""
    sizes = {"mesh.data": data, "mesh.fsdp": fsdp}
    unknown = [k for k, v in sizes.items() if v == -1]
    bad = [f"{k}={v}" for k, v in sizes.items() if v != -1 and v < 1]
    if bad or len(unknown) > 1:
        raise MeshError(
            f"mesh sizes must be positive or -1 (at most one -1), got data={data}, fsdp={fsdp}"
        )
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if unknown:
        if n_devices % known:
            raise MeshError(
                f"cannot fill {unknown[0]}=-1: {n_devices} devices are not divisible by {known}"
            )
        data, fsdp = (n_devices // known if v == -1 else v for v in (data, fsdp))
    if data * fsdp != n_devices:
        raise MeshError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are "
            f"{n_devices} devices; use -1 for one axis to take the rest"
        )
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A 2-D mesh with axes ('data', 'fsdp') over `devices` (default: all), Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(data, fsdp, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """Examples this process feeds per step; the global batch must split evenly over devices."""
    if global_batch < 1 or global_batch % mesh.size:
        raise MeshError(
            f"batch_size={global_batch} is not divisible by the {mesh.size} devices of the mesh "
            f"{dict(mesh.shape)}"
        )
    return global_batch // jax.process_count()


def make_global_batch(
    local: Mapping[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Process-local numpy arrays (B_local, ...) -> global jax.Arrays (B_global, ...) on `sharding`.

    Processes contribute their rows in process order (`jax.make_array_from_process_local_data`).
    """
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local.items()
    }
