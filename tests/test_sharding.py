"""Tests of the mesh and batch-sharding helpers (rankseg_jax/sharding.py)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from rankseg_jax import sharding as shd
from rankseg_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "data, fsdp, n, expected",
    [(-1, 1, 8, (8, 1)), (2, -1, 8, (2, 4)), (4, 2, 8, (4, 2)), (-1, 1, 1, (1, 1))],
)
def test_mesh_shape_resolves_minus_one(data, fsdp, n, expected):
    assert shd.mesh_shape(data, fsdp, n) == expected


@pytest.mark.parametrize(
    "data, fsdp, n, message",
    [
        (4, 4, 8, "16 devices, but there are 8"),
        (3, -1, 8, "not divisible by 3"),
        (-1, -1, 8, "at most one -1"),
        (0, 1, 8, "positive or -1"),
    ],
)
def test_mesh_shape_errors_are_clear(data, fsdp, n, message):
    with pytest.raises(ConfigError, match=message):
        shd.mesh_shape(data, fsdp, n)


def test_make_mesh_on_this_machine():
    mesh = shd.make_mesh(-1, 1)
    assert mesh.axis_names == ("data", "fsdp") and mesh.shape["fsdp"] == 1
    assert shd.local_batch_size(2 * mesh.size, mesh) == 2 * mesh.size
    with pytest.raises(ConfigError, match="mesh size|devices"):
        shd.make_mesh(mesh.size + 1, 1)


_FOUR_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    jax.config.update("jax_num_cpu_devices", 4)
    from jax.sharding import AxisType, PartitionSpec as P
    from rankseg_jax import sharding as shd
    from rankseg_jax.errors import ConfigError
    mesh = shd.make_mesh(2, -1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}, mesh.shape
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    s = shd.batch_sharding(mesh)
    assert s.spec == P(("data", "fsdp"))
    assert shd.local_batch_size(8, mesh) == 8
    try:
        shd.local_batch_size(6, mesh)
        raise SystemExit("no error for batch 6 on 4 devices")
    except ConfigError as err:
        assert "not divisible by the 4 devices" in str(err)
    local = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
    out = shd.make_global_batch(local, s)["x"]
    assert out.shape == (8, 3) and len(out.addressable_shards) == 4
    assert {sh.data.shape for sh in out.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(out), local["x"])
    print("OK")
    """
)


def test_four_cpu_devices_mesh_and_global_batch():
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
