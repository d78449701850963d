"""Meshes and shardings: a ('data', 'fsdp') mesh, the batch split over both axes, and the
parameter / optimizer-state shardings (regex rules plus big_vision's FSDP rule).

The batch (leading) dimension is split over ('data', 'fsdp'), so every device holds
batch_size / n_devices rows. Parameters follow the first matching rule of `PARAM_RULES`
(regex on the '/'-joined param path -> a PartitionSpec, "fsdp" or "replicate"); under "fsdp" a
tensor larger than `mesh.fsdp_min_size_mb` has its largest dimension divisible by the 'fsdp'
axis size sharded over 'fsdp' (others stay replicated). Optimizer-state leaves follow the param
whose path ends their own path and whose shape they share; anything else (step counters) is
replicated. With fsdp = 1 everything is replicated: plain data parallelism.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rankseg_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"

# (regex on the '/'-joined param path, tactic): the first match wins. A tactic is "fsdp",
# "replicate" or an explicit PartitionSpec.
PARAM_RULES: tuple[tuple[str, Any], ...] = ((r".*", "fsdp"),)


def mesh_shape(data: int, fsdp: int, n_devices: int) -> tuple[int, int]:
    """Resolve (data, fsdp) sizes where one of them may be -1 ("the rest of the devices")."""
    sizes = {"mesh.data": data, "mesh.fsdp": fsdp}
    unknown = [k for k, v in sizes.items() if v == -1]
    bad = [f"{k}={v}" for k, v in sizes.items() if v != -1 and v < 1]
    if bad or len(unknown) > 1:
        raise ConfigError(
            f"mesh sizes must be positive or -1 (at most one -1), got data={data}, fsdp={fsdp}"
        )
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if unknown:
        if n_devices % known:
            raise ConfigError(
                f"cannot fill {unknown[0]}=-1: {n_devices} devices are not divisible by {known}"
            )
        data, fsdp = (n_devices // known if v == -1 else v for v in (data, fsdp))
    if data * fsdp != n_devices:
        raise ConfigError(
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
        raise ConfigError(
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


def mesh_from_config(config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh of a full config (`mesh.data` x `mesh.fsdp`, -1 = the rest), and a check that
    `batch_size` splits over it; ConfigError names both numbers otherwise."""
    mesh = make_mesh(int(config.mesh.data), int(config.mesh.fsdp), devices)
    check_batch_divisible(int(config.batch_size), mesh)
    return mesh


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the batch axes ('data' x 'fsdp')."""
    ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if global_batch < 1 or global_batch % ways:
        raise ConfigError(
            f"batch_size={global_batch} is not divisible by the {ways} devices of the batch axes "
            f"{dict(mesh.shape)}; change batch_size or mesh.data/mesh.fsdp (a different global "
            "batch changes the training recipe: scale the learning rate or steps knowingly)"
        )


# ------------------------------------------------------------------------------ params


def key_name(key: Any) -> str:
    """One pytree key as a path component: dict key, attribute name or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: Sequence[Any]) -> str:
    """A pytree key path as 'a/b/c'."""
    return "/".join(key_name(k) for k in path)


def fsdp_spec(shape: Sequence[int], nbytes: int, axis_size: int, min_size_mb: float) -> P:
    """big_vision's FSDP rule: shard the largest dimension divisible by `axis_size` over 'fsdp'
    when the tensor is larger than `min_size_mb`; otherwise (or if none divides) replicate."""
    if axis_size <= 1 or nbytes <= min_size_mb * 2**20:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):  # stable: first on ties
        if shape[dim] % axis_size == 0 and shape[dim] >= axis_size:
            spec: list[Any] = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return P(*spec)
    return P()


def param_spec(
    name: str,
    leaf: Any,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, Any]] = PARAM_RULES,
    fsdp_min_size_mb: float = 4.0,
) -> P:
    """The PartitionSpec of one parameter (`leaf` has .shape and .dtype) by the first rule."""
    for pattern, tactic in rules:
        if re.fullmatch(pattern, name) is None:
            continue
        if isinstance(tactic, P):
            return tactic
        if tactic == "replicate":
            return P()
        if tactic == "fsdp":
            nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
            return fsdp_spec(leaf.shape, nbytes, mesh.shape.get(FSDP_AXIS, 1), fsdp_min_size_mb)
        raise ConfigError(f"sharding rule {pattern!r}: unknown tactic {tactic!r}")
    return P()


def param_shardings(
    abstract_params: Any,
    mesh: Mesh,
    *,
    rules: Sequence[tuple[str, Any]] = PARAM_RULES,
    fsdp_min_size_mb: float = 4.0,
) -> Any:
    """NamedSharding of every param leaf (a tree like `abstract_params`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh,
            param_spec(path_name(path), leaf, mesh, rules=rules, fsdp_min_size_mb=fsdp_min_size_mb),
        ),
        abstract_params,
    )


def follow_params(tree: Any, abstract_params: Any, params_sharding: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer-state-like tree: a leaf takes the sharding of the param whose
    '/'-path ends its own path (e.g. '0/mu/backbone/...' -> 'backbone/...') and whose shape it
    shares; other leaves (counts, scalars) are replicated."""
    flat_params = {
        path_name(p): (leaf.shape, s)
        for (p, leaf), s in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree.leaves(params_sharding),
            strict=True,
        )
    }
    replicated = NamedSharding(mesh, P())

    def match(path, leaf):
        names = [key_name(k) for k in path]
        for start in range(len(names)):
            hit = flat_params.get("/".join(names[start:]))
            if hit is not None and tuple(hit[0]) == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(match, tree)


def sharding_table(abstract: Any, shardings: Any) -> str:
    """A text table (path, shape, dtype, spec) of a tree and its shardings, for the logs."""
    rows = [
        (path_name(p), str(tuple(leaf.shape)), str(leaf.dtype), str(s.spec))
        for (p, leaf), s in zip(
            jax.tree_util.tree_flatten_with_path(abstract)[0],
            jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)),
            strict=True,
        )
    ]
    widths = [max(len(r[i]) for r in rows + [("path", "shape", "dtype", "spec")]) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
        for r in [("path", "shape", "dtype", "spec"), *rows]
    ]
    return "\n".join(lines)


def local_replica(tree: Any, mesh: Mesh) -> Any:
    """A full copy of `tree` on this process's first device (gathers FSDP shards).

    Evaluation runs per process on its own images with numpy inputs, so it needs params that
    live on a local device only (a jit over every process's devices would take numpy inputs as
    the same on all processes)."""
    gather: Callable[[Any], Any] = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))
    full = gather(tree)
    return jax.tree.map(lambda x: x.addressable_data(0), full)


def mesh_of(tree: Any) -> Mesh:
    """The mesh of the first leaf of a tree of NamedSharding-placed arrays."""
    return jax.tree.leaves(tree)[0].sharding.mesh
