"""An in-memory stand-in for the dataset readers, for pipeline tests (imports no JAX).

It lives in the package (not in tests/) so that grain's spawned worker processes can import it
without importing a test module (which would pull JAX into the workers).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def jax_backend_initialised() -> bool:
    """Whether this process has created a JAX backend client (without creating one)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and getattr(bridge, "_backends", None))


class FakeSource:
    """`n` deterministic examples with blocky labels of a few classes and some ignore pixels.

    Sizes cycle through `sizes` ((H, W) pairs). Indices in `corrupt` raise OSError like an
    unreadable file. With `probe_jax`, each name records whether a JAX backend (CPU/GPU/TPU
    client) has been initialised in the process that read it (grain itself imports jax, so
    "imported" says nothing).
    """

    def __init__(
        self,
        n: int,
        sizes: tuple[tuple[int, int], ...] = ((48, 64), (64, 40), (37, 53)),
        n_cls: int = 6,
        ignore_index: int = 255,
        corrupt: tuple[int, ...] = (),
        seed: int = 0,
        probe_jax: bool = False,
    ):
        self.n, self.sizes, self.n_cls, self.ignore_index = n, sizes, n_cls, ignore_index
        self.corrupt, self.seed, self.probe_jax = frozenset(corrupt), seed, probe_jax

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} examples")
        if index in self.corrupt:
            raise OSError(f"cannot decode fake_{index}.jpg")
        rng = np.random.default_rng([self.seed, index])
        h, w = self.sizes[index % len(self.sizes)]
        blocks = rng.integers(0, self.n_cls, (4, 4))
        blocks[rng.random((4, 4)) < 0.15] = self.ignore_index
        rows = np.arange(h) * 4 // h
        cols = np.arange(w) * 4 // w
        label = blocks[rows[:, None], cols[None, :]].astype(np.int32)
        base = (label.astype(np.int64) * 37 % 256)[..., None] + np.array([0, 60, 120])
        noise = rng.integers(-20, 21, (h, w, 3))
        image = np.clip(base + noise, 0, 255).astype(np.uint8)
        name = f"fake_{index}"
        if self.probe_jax:
            name += f"|jax_backend={jax_backend_initialised()}"
        return dict(image=image, label=label, name=name)
