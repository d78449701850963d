"""Convolution building blocks with PyTorch / mmcv semantics, NHWC (for conv decode heads).

* `BatchNorm`: torch's BatchNorm2d numerics. Train mode normalises with the batch statistics
  (biased variance, two-pass) and updates the running estimates in the `batch_stats`
  collection (`mean`, `var`, `num_batches_tracked`) with momentum 0.1 and the UNBIASED batch
  variance, as torch does. The statistics reduce over every axis but the channel one of the
  array the module sees, so under `jit` with a batch sharded over a mesh they are the global
  batch's (XLA inserts the all-reduce): SyncBN semantics without any collective written
  here. Under `shard_map`/`pmap`, `axis_name` averages the per-device moments instead.
  Statistics and the normalisation run in float32 whatever the compute dtype (bf16 policy).
  The affine is applied as torch's CPU kernel does (`x·α + β`, α = γ·invstd,
  β = b − μ·α), so float32 results round like the reference.
* `ConvModule`: mmcv's conv → BN → ReLU with its init (kaiming normal, fan_out, ReLU gain; BN
  weight 1, bias 0); the conv has a bias only without a norm (mmcv `bias='auto'`).
* `DepthwiseSeparableConvModule`: mmcv's depthwise ConvModule then pointwise ConvModule.
* `conv2d`: a torch Conv2d (symmetric padding, dilation, groups) on NHWC with an HWIO kernel.

Flax module names mirror the mmseg state-dict names (`stem_0` ↔ `stem.0`, `conv`/`bn`), so the
converter in `rankseg_jax/convert/mmseg_conv.py` maps every tensor by one rename.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# mmcv kaiming_init(mode='fan_out', nonlinearity='relu', distribution='normal'): N(0, 2/fan_out),
# not truncated. fan_out = kh·kw·C_out in both torch (OIHW) and flax (HWIO), groups or not.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# BaseDecodeHead.init_weights: normal_init(conv_seg, mean=0, std=0.01), bias 0.
CONV_SEG_INIT = nn.initializers.normal(0.01)


def _precision(dtype: Dtype) -> jax.lax.Precision | None:
    """Full float32 products for float32 compute (parity; no TF32 on GPUs), default for bf16."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """torch Conv2d on NHWC: x (B, H, W, C_in), kernel (kh, kw, C_in/groups, C_out) → NHWC.

    Symmetric zero padding `padding` on both spatial axes, as torch's int padding.
    """
    return jax.lax.conv_general_dilated(
        x.astype(dtype),
        kernel.astype(dtype),
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
        precision=_precision(dtype),
    )


def _sum(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Per-channel sum over every axis but the last, across `axis_name` devices if given."""
    total = jnp.sum(x, axis=tuple(range(x.ndim - 1)))
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def _count(x: jax.Array, axis_name: str | None) -> int:
    n = x.size // x.shape[-1]
    return n if axis_name is None else n * jax.lax.psum(1, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _bn_normalise(x, scale, bias, mean, var, eps, axis_name):
    """y = x·α + (β − μ·α), α = γ/√(σ² + eps): torch's CPU kernel's order."""
    alpha = scale * (1.0 / jnp.sqrt(var + eps))
    return x * alpha + (bias - mean * alpha)


def _bn_normalise_fwd(x, scale, bias, mean, var, eps, axis_name):
    invstd = 1.0 / jnp.sqrt(var + eps)
    alpha = scale * invstd
    return x * alpha + (bias - mean * alpha), (x, scale, mean, invstd)


def _bn_normalise_bwd(eps, axis_name, res, dy):
    """torch's CPU batch-norm backward, term for term (batch_norm_kernel.cpp). dx is the TOTAL
    derivative (through μ and σ² too), so μ and σ² get zero cotangents here."""
    del eps
    x, scale, mean, invstd = res
    n = _count(x, axis_name)
    centred = x - mean
    grad_sum = _sum(dy, axis_name)
    dot_p = _sum(centred * dy, axis_name)
    k = dot_p * invstd * invstd / n
    grad_mean = grad_sum / n
    dx = (dy - grad_mean - centred * k) * invstd * scale
    zero = jnp.zeros_like(mean)
    return dx, dot_p * invstd, grad_sum, zero, zero


_bn_normalise.defvjp(_bn_normalise_fwd, _bn_normalise_bwd)


def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, axis_name: str | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Train-mode BN of x (…, C) float32 with torch's formulas, forward and backward.

    Forward as torch's CPU kernel: μ = Σx/N, σ² = Σ(x − μ)²/N (two-pass, biased),
    invstd = 1/√(σ² + eps), y = x·α + (β − μ·α) with α = γ·invstd. Backward (custom VJP) as
    torch's: dx = (dy − Σdy/N − (x − μ)·Σ((x − μ)·dy)·invstd²/N)·invstd·γ, dγ = Σ((x − μ)·dy)
    ·invstd, dβ = Σdy. With only two values per channel (ASPP's image-pool BN at batch 2) the
    backward cancels catastrophically in float32; torch's order keeps the rounding closer to
    the reference's (tests/test_deeplab.py). Returns (y, μ, σ², N); μ and σ² are plain
    (differentiable) functions of x, for the running statistics.
    """
    n = _count(x, axis_name)
    mean = _sum(x, axis_name) / n
    var = _sum(jnp.square(x - mean), axis_name) / n
    return _bn_normalise(x, scale, bias, mean, var, eps, axis_name), mean, var, n


class Conv2d(nn.Module):
    """torch.nn.Conv2d on NHWC; params `kernel` (kh, kw, C_in/groups, C_out) and `bias` (C_out,).

    Params are float32; compute in `dtype`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    kernel_init: Any = KAIMING_FAN_OUT
    bias_init: Any = nn.initializers.zeros
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, H, W, C_in) → (B, H', W', features) in `dtype`."""
        k = self.kernel_size
        shape = (k, k, x.shape[-1] // self.groups, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        y = conv2d(x, kernel, self.stride, self.padding, self.dilation, self.groups, self.dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class BatchNorm(nn.Module):
    """torch BatchNorm2d / SyncBN on (…, C): see the module docstring for the semantics.

    Params `scale` (γ, init 1), `bias` (β, init 0); batch_stats `mean` (0), `var` (1),
    `num_batches_tracked` (int32 scalar; int64 in torch, converted on export). In train mode
    (`use_running_average=False`) the running stats are only written when the `batch_stats`
    collection is mutable, so a forward with `mutable=False` leaves them alone.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    axis_name: str | None = None
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        """x (…, C) → (…, C) in `dtype`; statistics over every axis but the last."""
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        tracked = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )
        x32 = x.astype(jnp.float32)
        if use_running_average:
            alpha = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
            return (x32 * alpha + (bias - ra_mean.value * alpha)).astype(self.dtype)
        y, mean, var, n = batch_norm_train(x32, scale, bias, self.epsilon, self.axis_name)
        if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
            m = self.momentum
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
            ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
            tracked.value = tracked.value + 1
        return y.astype(self.dtype)


class ConvModule(nn.Module):
    """mmcv ConvModule (order conv → norm → act): Conv2d → BatchNorm → ReLU, names `conv`, `bn`.

    norm False: a biased conv (mmcv `bias='auto'`), no BN. act False: no ReLU.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    norm: bool = True
    act: bool = True
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x (B, H, W, C_in) → (B, H', W', features)."""
        y = Conv2d(
            self.features,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            use_bias=not self.norm,
            dtype=self.dtype,
            name="conv",
        )(x)
        if self.norm:
            y = BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name="bn")(y, not train)
        return nn.relu(y) if self.act else y


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv DepthwiseSeparableConvModule: depthwise ConvModule (groups = C_in) → pointwise 1×1.

    Both parts keep the module's norm/act (mmcv's 'default' dw/pw configs); without a norm
    each conv has a bias (RankSegEncoderHead's `proj_dec`: norm None, ReLU after each).
    Names `depthwise_conv`, `pointwise_conv`.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    norm: bool = False
    act: bool = True
    dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x (B, H, W, C_in) → (B, H', W', features)."""
        c = x.shape[-1]
        common = dict(
            norm=self.norm, act=self.act, dtype=self.dtype, bn_axis_name=self.bn_axis_name
        )
        x = ConvModule(
            c,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            groups=c,
            name="depthwise_conv",
            **common,
        )(x, train)
        return ConvModule(self.features, 1, name="pointwise_conv", **common)(x, train)
