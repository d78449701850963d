"""The mmseg VisionTransformer backbone as Segmenter uses it (rankseg-spec.md section 1).

Parameter names mirror the mmseg state dict (`layers_{i}/ln1`, `attn/qkv`, `ffn/fc1`, ...) so
that the checkpoint mapping is one rule per tensor; `ln_final` is mmseg's final `backbone.ln1`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rankseg_jax.errors import ConfigError
from rankseg_jax.models.layers import Attention, DropPath, Dtype, Mlp, layer_norm

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# Encoder sizes per ViT variant: (width, depth, heads, mlp_dim).
VIT_VARIANTS = {
    "Ti/16": (192, 12, 3, 768),
    "S/16": (384, 12, 6, 1536),
    "B/16": (768, 12, 12, 3072),
    "L/16": (1024, 24, 16, 4096),
}

# The `config.model` keys this encoder reads (registry contract); 0 means "from the variant".
CONFIG: dict[str, Any] = dict(
    variant="B/16",
    patch_size=16,
    width=0,
    depth=0,
    num_heads=0,
    mlp_dim=0,
    drop_path_rate=0.1,
    oce=False,  # OCE: n_cls class tokens in the backbone, read by the decode head
    oce_start_layer=-1,
    remat="none",
)


def pad_to_patches(images: jax.Array, patch: int) -> jax.Array:
    """Zero-pad (B, H, W, C) at the bottom/right to multiples of `patch`, as mmseg's PatchEmbed."""
    _, h, w, _ = images.shape
    ph, pw = -h % patch, -w % patch
    if ph or pw:
        images = jnp.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)))
    return images


def resize_pos_embed(pos_embed: jax.Array, src_grid: tuple, dst_grid: tuple) -> jax.Array:
    """Resize a (1, 1 + h·w, D) position embedding to another grid with torch bicubic.

    The cls entry is kept apart; the grid part is resized with PyTorch's cubic convolution
    (A = −0.75, align_corners=False, no antialias), which `CUBIC_PYTORCH` reproduces.
    As in mmseg, the embedding is used as stored whenever the token *count* matches, even if
    the grid shape differs (e.g. a 4×9 grid against a stored 6×6): the reference quirk is kept
    so that the numbers match its checkpoints.
    """
    if src_grid[0] * src_grid[1] == dst_grid[0] * dst_grid[1]:
        return pos_embed
    d = pos_embed.shape[-1]
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:].reshape(1, *src_grid, d)
    grid = jax.image.resize(
        grid.astype(jnp.float32),
        (1, *dst_grid, d),
        method=jax.image.ResizeMethod.CUBIC_PYTORCH,
        antialias=False,
    )
    return jnp.concatenate([cls, grid.reshape(1, -1, d).astype(pos_embed.dtype)], axis=1)


class EncoderLayer(nn.Module):
    """Pre-norm ViT layer: LN eps 1e-6, torch-MHA attention, exact-GELU MLP, drop-path."""

    num_heads: int
    mlp_dim: int
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        attn = Attention(
            self.num_heads, out_name="out", scale_query=True, dtype=self.dtype,
            impl=self.attention_impl, name="attn",
        )  # fmt: skip
        y = attn(layer_norm(1e-6, "ln1")(x), deterministic)
        x = x + DropPath(self.drop_path)(y, deterministic)
        y = Mlp(self.mlp_dim, 0.0, self.dtype, name="ffn")(
            layer_norm(1e-6, "ln2")(x), deterministic
        )
        return x + DropPath(self.drop_path)(y, deterministic)


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


class VisionTransformer(nn.Module):
    """ViT encoder: (B, H, W, 3) normalised images of any size ≥ 16 → (B, h, w, D) features.

    With `n_cls_tokens` > 0 (OCE), learned class tokens join the sequence before layer
    `cls_start_layer` and come back as a second output (B, n_cls, D), final-normed.
    """

    img_size: tuple[int, int]
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    drop_path_rate: float = 0.0
    n_cls_tokens: int = 0
    cls_start_layer: int = -1
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: str = "none"

    @property
    def stored_grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        p, d = self.patch_size, self.width
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch_embed")(pad_to_patches(images, p))  # fmt: skip
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, d)
        # From scratch (no checkpoint, no AugReg file) cls/pos start as N(0, 0.02²) like timm;
        # the reference's random-init path leaves them at 0, which only hurts scratch training.
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
        n_pos = 1 + self.stored_grid[0] * self.stored_grid[1]
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, n_pos, d))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
        x = x + resize_pos_embed(pos, self.stored_grid, (gh, gw)).astype(x.dtype)
        x = self._layers(x, train)
        x = layer_norm(1e-6, "ln_final")(x)
        feats = x[:, 1 : 1 + gh * gw].reshape(b, gh, gw, d)
        if self.n_cls_tokens:
            return feats, x[:, 1 + gh * gw :]
        return feats

    def _layers(self, x: jax.Array, train: bool) -> jax.Array:
        layer_cls = EncoderLayer
        if self.remat != "none":
            layer_cls = nn.remat(
                EncoderLayer, policy=_remat_policy(self.remat), static_argnums=(2,)
            )
        for i in range(self.depth):
            if self.n_cls_tokens and i == self.cls_start_layer:
                x = self._append_class_tokens(x)
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x = layer_cls(
                self.num_heads, self.mlp_dim, rate, self.dtype, self.attention_impl,
                name=f"layers_{i}",
            )(x, not train)  # fmt: skip
            self.sow("intermediates", f"out_{i}", x)
        return x

    def _append_class_tokens(self, x: jax.Array) -> jax.Array:
        emb = self.param("cls_emb", nn.initializers.zeros, (1, self.n_cls_tokens, self.width))
        emb = jnp.broadcast_to(emb, (x.shape[0],) + emb.shape[1:]).astype(x.dtype)
        return jnp.concatenate([x, emb], axis=1)


def encoder_dims(m: ml_collections.ConfigDict) -> dict[str, int]:
    """Resolved (width, depth, num_heads, mlp_dim) of `config.model`; explicit values win."""
    if m.variant not in VIT_VARIANTS and not (m.width and m.depth):
        raise ConfigError(
            f"model.variant {m.variant!r} is not one of {', '.join(VIT_VARIANTS)}; "
            "set model.width/depth/num_heads/mlp_dim for a custom size"
        )
    width, depth, heads, mlp = VIT_VARIANTS.get(m.variant, (0, 0, 0, 0))
    width = m.width or width
    return dict(
        width=width,
        depth=m.depth or depth,
        num_heads=m.num_heads or heads or width // 64,
        mlp_dim=m.mlp_dim or mlp or 4 * width,
    )


def check_config(m: ml_collections.ConfigDict) -> None:
    """Raise ConfigError (naming the key) for ViT settings that cannot work."""
    encoder_dims(m)
    if m.remat not in REMAT_POLICIES:
        raise ConfigError(f"model.remat={m.remat!r} is not one of {REMAT_POLICIES}")
    for v in tuple(m.img_size):
        if v <= 0 or v % m.patch_size:
            raise ConfigError(
                f"model.img_size={tuple(m.img_size)} must be positive multiples of {m.patch_size}"
            )
    if m.classifier == "gt" and m.oce:
        raise ConfigError("model.classifier='gt' cannot be combined with model.oce")


def build(m: ml_collections.ConfigDict, dtype: Dtype) -> VisionTransformer:
    """The encoder of `config.model` (OCE class tokens when `model.oce`)."""
    dims = encoder_dims(m)
    return VisionTransformer(
        img_size=tuple(m.img_size),
        patch_size=m.patch_size,
        drop_path_rate=m.drop_path_rate,
        n_cls_tokens=m.n_cls if m.oce else 0,
        cls_start_layer=m.oce_start_layer if m.oce_start_layer >= 0 else dims["depth"] - 1,
        dtype=dtype,
        attention_impl=m.attention_impl,
        remat=m.remat,
        **dims,
    )


def size_multiple(m: ml_collections.ConfigDict) -> int:
    """Training crops must be multiples of the patch size."""
    return int(m.patch_size)


def out_width(m: ml_collections.ConfigDict) -> int:
    """Channels of the feature map the decode head receives."""
    return encoder_dims(m)["width"]
