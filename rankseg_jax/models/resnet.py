"""ResNetV1c as mmseg builds it (mmseg/models/backbones/resnet.py), NHWC, torch BatchNorm.

V1c = deep stem: three 3×3 convs (C/2 stride 2, C/2, C) each with BN + ReLU, then a 3×3 / 2 max
pool. Bottleneck blocks ("pytorch" style: the stride sits on the 3×3 conv), expansion 4, a
1×1 conv + BN projection on the first block of a stage when the stride or width changes.
The dilated "d8" variant used by DeepLabV3 has strides (1, 2, 1, 1) and dilations (1, 1, 2, 4);
with `contract_dilation` the first block of a dilated stage uses half the dilation.
`norm_eval=False`: BN follows the train flag (batch statistics in training).

Names mirror the state dict: `stem_0`/`stem_1` ↔ `stem.0`/`stem.1`, `layer1_0/conv1` ↔
`layer1.0.conv1`, `downsample_0`/`downsample_1` ↔ `downsample.0`/`.1`.

images (B, H, W, 3) → four stage outputs (B, H/4, W/4, 4C₀), (B, H/8, W/8, 8C₀), and, for d8,
(B, H/8, W/8, 16C₀), (B, H/8, W/8, 32C₀) with C₀ = base_channels (64 for the real model).

Registry component `resnet` (models/registry.py): `CONFIG` (`config.model.resnet`), `check_config`,
`build`, `out_width` (the four stage widths: a multi-level encoder).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rankseg_jax.errors import ConfigError
from rankseg_jax.models.conv import BatchNorm, Conv2d

Dtype = Any

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# `config.model.resnet`: mmseg's `deeplabv3_r50-d8.py` backbone (depth 101 for the R-101 rows).
CONFIG: dict[str, Any] = dict(
    resnet=dict(
        depth=101,
        stem_channels=64,
        base_channels=64,
        strides=(1, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        contract_dilation=True,
        # Blocks per stage, mmseg ResNet's `stage_blocks`: () = the depth's (3, 4, 23, 3) for
        # 101. Fewer blocks make small test models that keep every kind of block and stage.
        stage_blocks=(),
    )
)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch MaxPool2d(3, stride 2, padding 1) on NHWC (padding never wins the max)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nn.Module):
    """mmseg Bottleneck, style 'pytorch': 1×1 → 3×3 (stride, dilation) → 1×1 (×4), + identity.

    zero_init_residual: mmseg's default (`norm3` weight 0 at init, so each block starts as the
    identity); only the initialisation, a loaded checkpoint overrides it.
    """

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x (B, H, W, C_in) → (B, H/stride, W/stride, 4·planes)."""

        def bn(name: str, zero: bool = False) -> BatchNorm:
            init = nn.initializers.zeros if zero else nn.initializers.ones
            return BatchNorm(
                dtype=self.dtype, axis_name=self.bn_axis_name, scale_init=init, name=name
            )

        dt = self.dtype
        out = Conv2d(self.planes, 1, use_bias=False, dtype=dt, name="conv1")(x)
        out = nn.relu(bn("bn1")(out, not train))
        out = Conv2d(
            self.planes,
            3,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            use_bias=False,
            dtype=dt,
            name="conv2",
        )(out)
        out = nn.relu(bn("bn2")(out, not train))
        out = Conv2d(4 * self.planes, 1, use_bias=False, dtype=dt, name="conv3")(out)
        out = bn("bn3", zero=True)(out, not train)
        identity = x
        if self.downsample:
            project = Conv2d(
                4 * self.planes, 1, self.stride, use_bias=False, dtype=dt, name="downsample_0"
            )
            identity = project(x)
            identity = bn("downsample_1")(identity, not train)
        return nn.relu(out + identity.astype(out.dtype))


class ResNetV1c(nn.Module):
    """mmseg ResNetV1c (see the module docstring); returns the outputs of all four stages."""

    depth: int = 101
    stem_channels: int = 64
    base_channels: int = 64
    strides: tuple[int, ...] = (1, 2, 1, 1)
    dilations: tuple[int, ...] = (1, 1, 2, 4)
    contract_dilation: bool = True
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None
    stage_blocks: tuple[int, ...] | None = None  # None: DEPTHS[depth]

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, ...]:
        """images (B, H, W, 3) → 4 NHWC feature maps (see the module docstring)."""
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNetV1c depth {self.depth}: one of {sorted(DEPTHS)}")
        dt, axis = self.dtype, self.bn_axis_name
        x = images.astype(dt)
        half = self.stem_channels // 2
        for i, (width, stride) in enumerate(((half, 2), (half, 1), (self.stem_channels, 1))):
            x = Conv2d(width, 3, stride, 1, use_bias=False, dtype=dt, name=f"stem_{3 * i}")(x)
            x = BatchNorm(dtype=dt, axis_name=axis, name=f"stem_{3 * i + 1}")(x, not train)
            x = nn.relu(x)
        x = max_pool_3x3_s2(x)
        outs = []
        in_channels = self.stem_channels
        for stage, n_blocks in enumerate(self.stage_blocks or DEPTHS[self.depth]):
            planes = self.base_channels * 2**stage
            stride, dilation = self.strides[stage], self.dilations[stage]
            for j in range(n_blocks):
                first = j == 0
                d = dilation // 2 if first and self.contract_dilation and dilation > 1 else dilation
                x = Bottleneck(
                    planes,
                    stride=stride if first else 1,
                    dilation=d,
                    downsample=first and (stride != 1 or in_channels != 4 * planes),
                    dtype=dt,
                    bn_axis_name=axis,
                    name=f"layer{stage + 1}_{j}",
                )(x, train)
                in_channels = 4 * planes
            outs.append(x)
        return tuple(outs)


def check_config(m: ml_collections.ConfigDict) -> None:
    """ConfigError (naming the key) for ResNet settings that cannot work."""
    r = m.resnet
    if r.depth not in DEPTHS:
        raise ConfigError(f"model.resnet.depth={r.depth} is not one of {sorted(DEPTHS)}")
    if r.stage_blocks and (len(r.stage_blocks) != 4 or min(r.stage_blocks) < 1):
        raise ConfigError(f"model.resnet.stage_blocks={tuple(r.stage_blocks)}: () or four ints ≥ 1")
    for key in ("strides", "dilations"):
        if len(r[key]) != 4 or min(r[key]) < 1:
            raise ConfigError(f"model.resnet.{key}={tuple(r[key])}: four values ≥ 1")
    if r.stem_channels < 2 or r.stem_channels % 2 or r.base_channels < 1:
        raise ConfigError(
            f"model.resnet.stem_channels={r.stem_channels} (even, ≥ 2) / "
            f"base_channels={r.base_channels} (≥ 1)"
        )


def build(m: ml_collections.ConfigDict, dtype: Dtype) -> ResNetV1c:
    """The ResNetV1c of `config.model.resnet`."""
    r = m.resnet
    return ResNetV1c(
        int(r.depth),
        int(r.stem_channels),
        int(r.base_channels),
        tuple(int(s) for s in r.strides),
        tuple(int(d) for d in r.dilations),
        bool(r.contract_dilation),
        dtype=dtype,
        stage_blocks=tuple(int(n) for n in r.stage_blocks) or None,
    )


def out_width(m: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Widths of the four stage outputs (4, 8, 16, 32 × base_channels)."""
    return tuple(4 * m.resnet.base_channels * 2**i for i in range(4))


def size_multiple(m: ml_collections.ConfigDict) -> int:
    """Crops need no particular multiple (strided convs pad like torch)."""
    return 1
