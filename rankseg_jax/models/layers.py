"""Building blocks shared by the ViT encoder and the Segmenter/RankSeg decoders.

Numerics follow the PyTorch reference (rankseg-spec.md section 9): two-pass LayerNorm variance,
exact-erf GELU, softmax in float32, torch-style attention scaling (the encoder scales q before
the matmul as nn.MultiheadAttention does; the decoder scales the scores after it).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rankseg_jax.errors import ConfigError

Dtype = Any

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_CHOICES = ("none", "full")  # model.remat of the block encoders (swin, beit)
# The reference initialises every decoder Linear with trunc_normal(std=0.02), whose ±2 bounds are
# absolute (±100σ): effectively N(0, 0.02²). Encoder Linears keep flax's default.
HEAD_INIT = nn.initializers.normal(0.02)
DEFAULT_INIT = nn.linear.default_kernel_init


def layer_norm(eps: float, name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """A torch-equivalent LayerNorm: two-pass variance, statistics in float32."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU written as torch.nn.GELU computes it: x · ½ · (1 + erf(x / √2)).

    Not the tanh form (jax's default). `jax.nn.gelu(approximate=False)` computes the same
    function through erfc, which XLA:CPU lowers to a ~4× slower polynomial; `lax.erf` gets
    the fast vectorised kernel. The two agree to float32 rounding (≤ 5e-7 absolute), and this
    one follows torch's formula term for term.
    """
    x32 = x.astype(jnp.float32)  # bf16 compute: erf in float32 (fused, free on accelerators)
    return (x32 * 0.5 * (1.0 + jax.lax.erf(x32 * (2**-0.5)))).astype(x.dtype)


class DenseAt(nn.Module):
    """A Dense layer (float32 params) whose compute dtype is chosen per call.

    RankSeg's `proj_dec` feeds both the pooled tokens of the image-level branch (float32 under
    the bf16 policy) and the pixel tokens (bf16); one module keeps the one checkpoint entry.
    Same numerics as `nn.Dense(dtype=dtype)`: x (..., D_in) → (..., features) in `dtype`.
    """

    features: int
    kernel_init: Any = HEAD_INIT

    @nn.compact
    def __call__(self, x: jax.Array, dtype: Dtype) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return jnp.dot(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops whole residual branches per sample, scales kept ones by 1/(1-p)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _use_fused(impl: str, dtype: Dtype, dropout_active: bool, has_mask: bool) -> bool:
    if impl == "xla" or dropout_active or has_mask:
        return False
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "cudnn":
        if not (on_gpu and half):
            raise ValueError("attention_impl='cudnn' needs a GPU and bfloat16/float16 compute")
        return True
    return on_gpu and half


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection laid out [q | k | v] × heads.

    Attributes:
        num_heads: heads; the head width is width // num_heads.
        out_name: name of the output projection ('out' in the encoder, 'proj' in the decoder).
        scale_query: scale q before q·kᵀ (torch MHA) instead of the scores after it.
        attn_dropout / proj_dropout: dropout on attention probabilities / after the projection.
    """

    num_heads: int
    out_name: str = "proj"
    scale_query: bool = False
    attn_dropout: float = 0.0
    proj_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    impl: str = "auto"
    kernel_init: Any = DEFAULT_INIT

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool, key_mask: jax.Array | None = None
    ) -> jax.Array:
        """x (B, N, D) → (B, N, D); key_mask (B, N) bool marks keys that may be attended."""
        b, n, d = x.shape
        hd = d // self.num_heads
        qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=self.kernel_init, name="qkv")(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
        dropout_active = not deterministic and self.attn_dropout > 0.0
        if _use_fused(self.impl, self.dtype, dropout_active, key_mask is not None):
            q, k, v = (qkv[:, :, i] for i in range(3))  # (B, N, H, hd): cuDNN's BTNH layout
            out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        else:
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, H, N, hd) each
            out = self._xla_attention(q, k, v, deterministic, key_mask).transpose(0, 2, 1, 3)
        dense = nn.Dense(d, dtype=self.dtype, kernel_init=self.kernel_init, name=self.out_name)
        out = dense(out.reshape(b, n, d))
        return nn.Dropout(self.proj_dropout)(out, deterministic=deterministic)

    def _xla_attention(self, q, k, v, deterministic, key_mask):
        """Head-major q, k, v (B, H, N, hd) → (B, H, N, hd); scores and softmax in float32.

        Head-major operands make both matmuls plain batched GEMMs over (B, H); with the
        token-major (B, N, H, hd) layout XLA:CPU transposes inside each dot (2× slower forward
        on ViT-S/16 at 256²).
        """
        scale = q.shape[-1] ** -0.5
        if self.scale_query:
            q = q * jnp.asarray(scale, q.dtype)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        if not self.scale_query:
            scores = scores * scale
        if key_mask is not None:
            scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(self.attn_dropout, broadcast_dims=())(probs, deterministic)
        return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)


class Mlp(nn.Module):
    """fc1 → exact GELU → dropout → fc2 → dropout."""

    hidden: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    kernel_init: Any = DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        init = self.kernel_init
        y = gelu(nn.Dense(self.hidden, dtype=self.dtype, kernel_init=init, name="fc1")(x))
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = nn.Dense(d, dtype=self.dtype, kernel_init=init, name="fc2")(y)
        return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class DecoderBlock(nn.Module):
    """The Segmenter decoder block: pre-norm (LN eps 1e-5), dropout 0.1 in attention and MLP."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.1
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool, key_mask: jax.Array | None = None
    ) -> jax.Array:
        """x (B, N, D) → (B, N, D)."""
        attn = Attention(
            self.num_heads,
            out_name="proj",
            attn_dropout=self.dropout,
            proj_dropout=self.dropout,
            dtype=self.dtype,
            impl=self.attention_impl,
            kernel_init=HEAD_INIT,
            name="attn",
        )
        y = attn(layer_norm(1e-5, "norm1")(x), deterministic, key_mask)
        x = x + DropPath(self.drop_path)(y, deterministic)
        y = Mlp(self.mlp_dim, self.dropout, self.dtype, HEAD_INIT, name="mlp")(
            layer_norm(1e-5, "norm2")(x), deterministic
        )
        return x + DropPath(self.drop_path)(y, deterministic)


CANVAS_FILL = -100.0


def scatter_to_classes(masks: jax.Array, topk: jax.Array | None, n_cls: int) -> jax.Array:
    """Scatter slot logits (B, h, w, k) into (B, h, w, n_cls) filled with exactly −100.

    Slot j goes to channel topk[b, j]; negative ids (padded GT slots) are dropped. With
    topk None (baseline) the masks already are in class order and are returned as they are.
    """
    if topk is None:
        return masks
    ids = jnp.where(topk < 0, n_cls, topk)

    def one(m, idx):
        canvas = jnp.full(m.shape[:-1] + (n_cls,), CANVAS_FILL, m.dtype)
        return canvas.at[:, :, idx].set(m, mode="drop")

    return jax.vmap(one)(masks, ids)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize (B, h, w, C) to (B, H, W, C) like torch bilinear with align_corners=False."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    shape = (x.shape[0], *size, x.shape[-1])
    return jax.image.resize(x, shape, method="linear", antialias=False)


def check_block_encoder(m: Any, name: str) -> None:
    """ConfigError for the settings every stochastic-depth block encoder shares (swin, beit):
    `model.<name>.drop_path_rate` in [0, 1) and `model.remat` one of REMAT_CHOICES."""
    rate = m[name].drop_path_rate
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"model.{name}.drop_path_rate={rate} must be in [0, 1)")
    if m.remat not in REMAT_CHOICES:
        raise ConfigError(
            f"model.remat={m.remat!r}: the {name} encoder has {', '.join(REMAT_CHOICES)} "
            "(per-block checkpointing)"
        )
