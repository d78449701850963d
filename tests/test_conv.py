"""torch-semantics conv blocks (rankseg_jax/models/conv.py): BatchNorm's train/eval numerics and
running-stat update, ConvModule / depthwise-separable shapes and init, conv2d vs torch."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rankseg_jax.models import conv

TOL = 1e-5


def _x(shape, seed=0, loc=0.5, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, shape).astype(np.float32)


def _bn_step(x: np.ndarray, steps: int = 2):
    """Train-mode BatchNorm applied `steps` times; returns outputs, stats, eval output."""
    bn = conv.BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=True)
    params = {
        "scale": jnp.linspace(0.5, 1.5, x.shape[-1]),
        "bias": jnp.linspace(-1, 1, x.shape[-1]),
    }
    stats = variables["batch_stats"]
    for _ in range(steps):
        y, mutated = bn.apply(
            {"params": params, "batch_stats": stats}, x, False, mutable=["batch_stats"]
        )
        stats = mutated["batch_stats"]
    y_eval = bn.apply({"params": params, "batch_stats": stats}, x, True)
    return params, y, stats, y_eval


def test_batchnorm_matches_numpy_formulas():
    """Batch statistics (biased) normalise; running var: UNBIASED, momentum 0.1."""
    x = _x((2, 5, 3, 4))
    params, y, stats, y_eval = _bn_step(x, steps=2)
    mean = x.mean((0, 1, 2))
    var = x.var((0, 1, 2))
    expect = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(params["scale"]) + np.asarray(
        params["bias"]
    )
    np.testing.assert_allclose(np.asarray(y), expect, rtol=0, atol=TOL)
    n = x.size // x.shape[-1]
    rm, rv = np.zeros(4), np.ones(4)
    for _ in range(2):
        rm = 0.9 * rm + 0.1 * mean
        rv = 0.9 * rv + 0.1 * var * n / (n - 1)
    np.testing.assert_allclose(np.asarray(stats["mean"]), rm, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(stats["var"]), rv, rtol=1e-6, atol=1e-7)
    assert int(stats["num_batches_tracked"]) == 2
    assert stats["num_batches_tracked"].shape == ()
    expect_eval = (x - rm) / np.sqrt(rv + 1e-5) * np.asarray(params["scale"]) + np.asarray(
        params["bias"]
    )
    np.testing.assert_allclose(np.asarray(y_eval), expect_eval, rtol=0, atol=TOL)


def test_batchnorm_without_mutable_stats_leaves_them():
    x = _x((2, 3, 3, 4))
    bn = conv.BatchNorm()
    variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=True)
    y = bn.apply(variables, x, False)  # train numerics, stats not mutable: no error, no update
    assert np.abs(np.asarray(y).mean((0, 1, 2))).max() < 1e-5


def test_batchnorm_bf16_keeps_float32_statistics():
    x = _x((2, 4, 4, 8), loc=3.0)
    bn = conv.BatchNorm(dtype=jnp.bfloat16)
    variables = bn.init(jax.random.PRNGKey(0), x, use_running_average=True)
    y, mutated = bn.apply(variables, jnp.asarray(x, jnp.bfloat16), False, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    stats = mutated["batch_stats"]
    assert stats["mean"].dtype == jnp.float32 and stats["var"].dtype == jnp.float32
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * xb.mean((0, 1, 2)), rtol=1e-5)


def test_batchnorm_matches_torch(torch):
    """Train forward, running stats, input gradient and eval forward equal torch's BatchNorm2d."""
    x = _x((2, 6, 5, 3), seed=1, loc=-1.0, scale=3.0)
    params, y, stats, y_eval = _bn_step(x, steps=1)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.asarray(params["scale"])))
        ref.bias.copy_(torch.tensor(np.asarray(params["bias"])))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    out = ref.train()(xt)
    w = torch.from_numpy(_x(out.shape, seed=2))
    (out * w).sum().backward()
    np.testing.assert_allclose(np.asarray(y), out.detach().numpy().transpose(0, 2, 3, 1), atol=TOL)
    np.testing.assert_allclose(np.asarray(stats["mean"]), ref.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), ref.running_var.numpy(), atol=1e-6)
    ref.eval()
    with torch.no_grad():
        out_eval = ref(xt).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(y_eval), out_eval, atol=TOL)

    bn = conv.BatchNorm()
    variables = {"params": params, "batch_stats": stats}
    wj = w.numpy().transpose(0, 2, 3, 1)
    grad = jax.grad(lambda v: jnp.sum(bn.apply(variables, v, False) * wj))(jnp.asarray(x))
    np.testing.assert_allclose(
        np.asarray(grad), xt.grad.numpy().transpose(0, 2, 3, 1), rtol=0, atol=TOL
    )


@pytest.mark.parametrize(
    "stride,padding,dilation,groups", [(1, 0, 1, 1), (2, 1, 1, 1), (1, 3, 3, 1), (1, 0, 1, 4)]
)
def test_conv2d_matches_torch(torch, stride, padding, dilation, groups):
    x = _x((2, 9, 7, 4), seed=3)
    k = 1 if groups > 1 else 3
    kernel = _x((k, k, 4 // groups, 8), seed=4, loc=0.0, scale=0.3)
    y = conv.conv2d(jnp.asarray(x), jnp.asarray(kernel), stride, padding, dilation, groups)
    ref = torch.nn.functional.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    np.testing.assert_allclose(np.asarray(y), ref.numpy().transpose(0, 2, 3, 1), atol=TOL)


def test_conv_module_layout_and_init():
    """conv (no bias) → bn → ReLU; kaiming fan_out std; depthwise-separable with biases."""
    module = conv.ConvModule(64, 3, padding=1)
    x = jnp.ones((1, 8, 8, 32))
    variables = module.init(jax.random.PRNGKey(0), x, train=False)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables), sep="/")
    assert set(flat) == {
        "params/conv/kernel", "params/bn/scale", "params/bn/bias", "batch_stats/bn/mean",
        "batch_stats/bn/var", "batch_stats/bn/num_batches_tracked",
    }  # fmt: skip
    kernel = np.asarray(flat["params/conv/kernel"])
    assert kernel.shape == (3, 3, 32, 64)
    expected_std = np.sqrt(2.0 / (3 * 3 * 64))
    assert abs(kernel.std() / expected_std - 1) < 0.05
    y = module.apply(variables, x, train=False)
    assert y.shape == (1, 8, 8, 64) and float(y.min()) >= 0.0

    sep = conv.DepthwiseSeparableConvModule(16, 1)
    variables = sep.init(jax.random.PRNGKey(1), jnp.ones((2, 4, 4, 8)), train=False)
    params = variables["params"]
    assert params["depthwise_conv"]["conv"]["kernel"].shape == (1, 1, 1, 8)
    assert params["depthwise_conv"]["conv"]["bias"].shape == (8,)
    assert params["pointwise_conv"]["conv"]["kernel"].shape == (1, 1, 8, 16)
    assert "batch_stats" not in variables
