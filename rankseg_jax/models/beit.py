"""The BEiT segmentation backbone of unilm (`semantic_segmentation/backbone/beit.py`), NHWC.

As the RankSeg fork's `backbones/beit.py` configures it for the BEiT-L/16 640 rows (issue #18):

- patch embedding: a 16×16 / stride-16 conv (input sides must be multiples of 16 and equal
  the `img_size` the relative position index was built for), a cls token, **no** absolute
  position embedding;
- blocks: pre-norm (LN eps 1e-6) attention with a relative position bias table per block
  ((2h−1)(2w−1) + 3 entries: the grid offsets and cls→token, token→cls, cls→cls), the qkv
  Linear without bias plus learned `q_bias` and `v_bias` (k has none), q scaled before q·kᵀ;
  exact-GELU MLP; layer scale (`gamma_1`, `gamma_2`, init `init_values`) on both residual
  branches; drop-path growing linearly to `drop_path_rate`;
- outputs: the tokens (cls dropped) after the blocks in `out_indices`, reshaped to the patch grid,
  then fpn1 (ConvT 2×2/2 → BN → GELU → ConvT 2×2/2: stride 4), fpn2 (ConvT: stride 8),
  fpn3 (identity: stride 16), fpn4 (max-pool 2×2/2, floor: stride 32).

Parameter names mirror the torch state dict (`blocks_{i}/attn/q_bias`, `fpn1_0/weight`, ...);
the transposed convs keep torch's (in, out, kh, kw) weight layout.

Registry component `beit` (models/registry.py): `CONFIG` (`config.model.beit`), `check_config`,
`build`, `out_width` (four maps of embed_dim channels: a multi-level encoder), `size_multiple`.
The relative position index is built for the variant's grid, so `model.img_size` must be the
variant's `img_size` (the rows evaluate with sliding windows of that size).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rankseg_jax.errors import ConfigError
from rankseg_jax.models.conv import BatchNorm
from rankseg_jax.models.layers import (
    DropPath,
    Dtype,
    check_block_encoder,
    gelu,
    layer_norm,
)

TRUNC_INIT = nn.initializers.truncated_normal(0.02)


@dataclasses.dataclass(frozen=True)
class BeitVariant:
    """Sizes of one BEiT backbone (unilm's constructor arguments)."""

    img_size: int
    embed_dim: int
    depth: int
    num_heads: int
    out_indices: tuple[int, ...]
    patch_size: int = 16
    mlp_ratio: int = 4
    init_values: float = 1e-6


BEIT_VARIANTS = {
    # BEiT-L/16 at 640 (the fb7a30f ADE20K row): out_indices 7, 11, 15, 23.
    "beit_large_640": BeitVariant(640, 1024, 24, 16, (7, 11, 15, 23)),
    "beit_base_640": BeitVariant(640, 768, 12, 12, (3, 5, 7, 11), init_values=0.1),
    # The family fixtures' small model (official_family README).
    "beit_test": BeitVariant(48, 32, 4, 2, (0, 1, 2, 3)),
}


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
    """(h·w + 1, h·w + 1) index into the bias table, as unilm's Attention builds it.

    Token pairs: (dr + h − 1)·(2w − 1) + (dc + w − 1); then the extra entries n, n+1, n+2
    (n = (2h−1)(2w−1)) for cls→token (row 0), token→cls (column 0) and cls→cls.
    """
    h, w = grid
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    n_rel = (2 * h - 1) * (2 * w - 1)
    index = np.zeros((h * w + 1, h * w + 1), np.int32)
    index[1:, 1:] = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    index[0, :] = n_rel
    index[:, 0] = n_rel + 1
    index[0, 0] = n_rel + 2
    return index


class BeitAttention(nn.Module):
    """x (B, 1 + h·w, D) → same; q/v biases, per-block relative position bias."""

    num_heads: int
    grid: tuple[int, int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.num_heads
        h, w = self.grid
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.zeros,
            ((2 * h - 1) * (2 * w - 1) + 3, self.num_heads),
            jnp.float32,
        )
        q_bias = self.param("q_bias", nn.initializers.zeros, (d,), jnp.float32)
        v_bias = self.param("v_bias", nn.initializers.zeros, (d,), jnp.float32)
        bias = jnp.concatenate([q_bias, jnp.zeros_like(v_bias), v_bias]).astype(self.dtype)
        qkv = nn.Dense(3 * d, use_bias=False, dtype=self.dtype, kernel_init=TRUNC_INIT, name="qkv")
        qkv = qkv(x) + bias
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        q = q * jnp.asarray(hd**-0.5, q.dtype)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)
        index = relative_position_index(self.grid).reshape(-1)
        rel = table[index].reshape(n, n, self.num_heads).transpose(2, 0, 1)
        probs = jax.nn.softmax(scores + rel[None], axis=-1)
        out = jnp.einsum("bhqk,bhkd->bqhd", probs.astype(v.dtype), v).reshape(b, n, d)
        return nn.Dense(d, dtype=self.dtype, kernel_init=TRUNC_INIT, name="proj")(out)


class BeitMlp(nn.Module):
    """fc1 → exact GELU → fc2 (unilm `Mlp`; its dropout is 0 in the BEiT rows)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=TRUNC_INIT, name="fc1")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=TRUNC_INIT, name="fc2")(gelu(y))


class BeitBlock(nn.Module):
    """x + drop_path(γ₁·attn(norm1 x)); x + drop_path(γ₂·mlp(norm2 x))."""

    num_heads: int
    grid: tuple[int, int]
    mlp_ratio: int = 4
    init_values: float = 1e-6
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        init = nn.initializers.constant(self.init_values)
        gamma_1 = self.param("gamma_1", init, (d,), jnp.float32).astype(self.dtype)
        gamma_2 = self.param("gamma_2", init, (d,), jnp.float32).astype(self.dtype)
        y = BeitAttention(self.num_heads, self.grid, self.dtype, name="attn")(
            layer_norm(1e-6, "norm1", self.dtype)(x)
        )
        x = x + DropPath(self.drop_path)(gamma_1 * y, deterministic)
        y = BeitMlp(self.mlp_ratio * d, self.dtype, name="mlp")(
            layer_norm(1e-6, "norm2", self.dtype)(x)
        )
        return x + DropPath(self.drop_path)(gamma_2 * y, deterministic)


class ConvTranspose2x2(nn.Module):
    """torch ConvTranspose2d(kernel 2, stride 2): (B, H, W, C) → (B, 2H, 2W, features).

    Kernel 2 / stride 2 windows do not overlap, so out[2i+a, 2j+c] = x[i, j]·W[:, :, a, c] + b
    exactly (one einsum). `weight` keeps torch's (C_in, C_out, 2, 2) layout.
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        weight = self.param("weight", TRUNC_INIT, (c, self.features, 2, 2), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        precision = jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
        y = jnp.einsum(
            "bijc,cokl->bikjlo",
            x.astype(self.dtype),
            weight.astype(self.dtype),
            precision=precision,
        )
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class BEiT(nn.Module):
    """images (B, S, S, 3), S = variant.img_size → four NHWC maps at strides 4, 8, 16, 32.

    Attributes:
        variant: the sizes (BEIT_VARIANTS).
        drop_path_rate: the last block's drop-path rate.
        remat: checkpoint each block (BEiT-L at 640 stores 24 × 1601-token activations).
    """

    variant: BeitVariant
    drop_path_rate: float = 0.2
    dtype: Dtype = jnp.float32
    remat: bool = False
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
        """`train`: drop-path active and fpn1's BN on batch statistics."""
        v = self.variant
        deterministic = not train
        p = v.patch_size
        grid = (v.img_size // p, v.img_size // p)
        b, h, w, _ = images.shape
        if (h // p, w // p) != grid or h % p or w % p:
            raise ValueError(f"BEiT built for {v.img_size}² inputs got {h}×{w}")
        x = _PatchEmbed(v.embed_dim, p, self.dtype, name="patch_embed")(images)
        x = x.reshape(b, grid[0] * grid[1], v.embed_dim)
        cls = self.param("cls_token", TRUNC_INIT, (1, 1, v.embed_dim), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, v.embed_dim)), x], 1)
        rates = np.linspace(0.0, self.drop_path_rate, v.depth)
        block_cls = nn.remat(BeitBlock, static_argnums=(2,)) if self.remat else BeitBlock
        feats = []
        for i in range(v.depth):
            block = block_cls(
                v.num_heads,
                grid,
                v.mlp_ratio,
                v.init_values,
                float(rates[i]),
                self.dtype,
                name=f"blocks_{i}",
            )
            x = block(x, deterministic)
            if i in v.out_indices:
                feats.append(x[:, 1:].reshape(b, *grid, v.embed_dim))
        d = v.embed_dim
        y = ConvTranspose2x2(d, self.dtype, name="fpn1_0")(feats[0])
        y = BatchNorm(dtype=self.dtype, axis_name=self.bn_axis_name, name="fpn1_1")(y, not train)
        outs = [ConvTranspose2x2(d, self.dtype, name="fpn1_3")(gelu(y))]
        outs.append(ConvTranspose2x2(d, self.dtype, name="fpn2_0")(feats[1]))
        outs.append(feats[2])
        f = feats[3]
        hh, ww = f.shape[1] // 2, f.shape[2] // 2
        f = f[:, : 2 * hh, : 2 * ww].reshape(b, hh, 2, ww, 2, d).max(axis=(2, 4))
        outs.append(f)
        return outs


class _PatchEmbed(nn.Module):
    """unilm PatchEmbed: conv p×p / stride p named `proj`, (B, H, W, 3) → (B, H/p, W/p, D)."""

    embed_dim: int
    patch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch
        conv = nn.Conv(
            self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj"
        )
        return conv(images)


# --------------------------------------------------------------------------------------------
# Registry component `beit`
# --------------------------------------------------------------------------------------------

# `config.model.beit`: the fb7a30f BEiT-L/16 640 rows (drop-path 0.2, out_indices 7/11/15/23).
# `model.remat` 'full' checkpoints every block (nn.remat; benchmarks/README.md).
CONFIG: dict = dict(beit=dict(variant="beit_large_640", drop_path_rate=0.2))


def check_config(m: ml_collections.ConfigDict) -> None:
    """ConfigError (naming the key) for BEiT settings that cannot work."""
    if m.beit.variant not in BEIT_VARIANTS:
        raise ConfigError(
            f"model.beit.variant={m.beit.variant!r} is not one of {', '.join(BEIT_VARIANTS)}"
        )
    v = BEIT_VARIANTS[m.beit.variant]
    if tuple(m.img_size) != (v.img_size, v.img_size):
        raise ConfigError(
            f"model.img_size={tuple(m.img_size)}: the {m.beit.variant} backbone is built for "
            f"{v.img_size}×{v.img_size} inputs (its relative position grid)"
        )
    check_block_encoder(m, "beit")


def build(m: ml_collections.ConfigDict, dtype: Dtype) -> BEiT:
    """The BEiT backbone of `config.model.beit` (+ `model.remat`)."""
    return BEiT(
        BEIT_VARIANTS[m.beit.variant],
        float(m.beit.drop_path_rate),
        dtype,
        remat=m.remat == "full",
    )


def out_width(m: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Widths of the four outputs (fpn1..fpn4 keep embed_dim)."""
    return (BEIT_VARIANTS[m.beit.variant].embed_dim,) * 4


def size_multiple(m: ml_collections.ConfigDict) -> int:
    """Crops must be multiples of the patch size (and equal img_size: check_config)."""
    return BEIT_VARIANTS[m.beit.variant].patch_size
