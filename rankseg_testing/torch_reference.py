"""PyTorch reference of Segmenter and Segmenter + RankSeg, the parity oracle for the JAX port.

Written from rankseg-spec.md (sections 1, 2, 3, 4.1) in plain torch (no mmcv, mmseg or timm) and
checked against the outputs of the official code in the shared fixtures. Module and parameter
names equal the mmseg state-dict keys (spec 6.2), so official checkpoints load with
``load_state_dict(strict=True)``.

Only tests and benchmarks import this module; the rest of ``rankseg_jax`` must not import torch.

Layouts are the reference's: images and logits NCHW, labels (B, H, W) int64 with 255 = ignore,
tokens row-major (t = h * Wp + w).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255
CANVAS_FILL = -100.0
HEAD_TYPES = ("mask", "rankseg", "gt")
NO_BACKBONE_CLS_EMB = "cls_emb_from_backbone=True but no backbone cls_emb was given"
AUG_TEST_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


class TorchReferenceError(ValueError):
    """Bad input to the torch reference (a wrong shape, a missing checkpoint key, ...)."""


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def resize_bilinear(x: Tensor, size: Sequence[int]) -> Tensor:
    """mmseg ``resize``: bilinear, align_corners=False, no antialias. (B, C, h, w) -> size."""
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def drop_path_rates(max_rate: float, n_layers: int) -> list[float]:
    """Stochastic-depth schedule linspace(0, max_rate, n_layers), as float32 torch computes it."""
    return [r.item() for r in torch.linspace(0, max_rate, n_layers, device="cpu")]


class DropPath(nn.Module):
    """Stochastic depth per sample, as timm/mmcv: (B, 1, ...) Bernoulli(1 - p), kept / (1 - p)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
        return x.div(keep_prob) * random_tensor.floor()


# --------------------------------------------------------------------------------------------
# Backbone (spec section 1)
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Zero-pads bottom/right to a multiple of the patch, then a stride-p conv (spec 1.2)."""

    def __init__(self, in_channels: int, embed_dims: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(in_channels, embed_dims, patch_size, stride=patch_size)

    def forward(self, img: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, Hp * Wp, D) row-major, and the grid (Hp, Wp)."""
        p = self.patch_size
        height, width = img.shape[2], img.shape[3]
        if height % p != 0:
            img = F.pad(img, (0, 0, 0, p - height % p))
        if width % p != 0:
            img = F.pad(img, (0, p - width % p, 0, 0))
        x = self.projection(img)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid


class _MultiheadAttention(nn.Module):
    """mmcv's MultiheadAttention wrapper: torch MHA on (N, B, D), called with q = k = v.

    Keeps the child name ``attn`` (keys ``attn.attn.in_proj_weight`` ...) and calls torch MHA the
    way mmcv 1.3.12 does (sequence-first, need_weights left at True), so the numerics follow the
    same code path as the official fixtures.
    """

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=0.0, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        seq_first = x.transpose(0, 1)
        out = self.attn(query=seq_first, key=seq_first, value=seq_first)[0]
        return out.transpose(0, 1)


class _FFN(nn.Module):
    """mmcv FFN: ``layers.0.0`` fc1, exact GELU, ``layers.1`` fc2 (dropouts are 0)."""

    def __init__(self, embed_dims: int, hidden_dims: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, hidden_dims), nn.GELU(), nn.Dropout(0.0)),
            nn.Linear(hidden_dims, embed_dims),
            nn.Dropout(0.0),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class EncoderLayer(nn.Module):
    """Pre-norm ViT layer (spec 1.4): LN eps 1e-6, torch MHA, exact-GELU MLP, drop-path."""

    def __init__(
        self, embed_dims: int, num_heads: int, hidden_dims: int, drop_path_rate: float
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.attn = _MultiheadAttention(embed_dims, num_heads)
        self.ln2 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.ffn = _FFN(embed_dims, hidden_dims)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.ln1(x)))
        return x + self.drop_path(self.ffn(self.ln2(x)))


class ViTOutput(NamedTuple):
    """Backbone outputs. ``layer_outputs[i]`` is the NCHW map after layer i, (B, D, Hp, Wp),
    with the cls token (and OCE class tokens) removed; only the last one is final-normed.
    ``feat`` is ``layer_outputs[-1]``. ``cls_emb`` is the OCE class tokens (B, n_cls, D) after
    the final norm, or None without OCE."""

    feat: Tensor
    cls_emb: Tensor | None
    layer_outputs: list[Tensor]


class VisionTransformer(nn.Module):
    """mmseg ``VisionTransformer`` as the Segmenter configs build it (spec 1).

    Args:
        img_size: the size the position embedding is stored for, (H, W); other inputs resize it
            (torch bicubic, align_corners=False, cls entry kept apart) on every forward.
        n_cls: with ``cls_emb_start_layer``, the OCE variant (spec 1.6): a ``cls_emb``
            (1, n_cls, D) parameter appended to the sequence before that layer.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 512,
        patch_size: int = 16,
        embed_dims: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: int = 4,
        drop_path_rate: float = 0.0,
        n_cls: int | None = None,
        cls_emb_start_layer: int | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if embed_dims % num_heads != 0:
            raise TorchReferenceError(
                f"embed_dims {embed_dims} is not divisible by {num_heads} heads"
            )
        self.img_size = _pair(img_size)
        self.patch_size = patch_size
        self.embed_dims = embed_dims
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, embed_dims))
        oce = n_cls is not None and cls_emb_start_layer is not None
        if (n_cls is None) != (cls_emb_start_layer is None):
            raise TorchReferenceError("OCE needs both n_cls and cls_emb_start_layer (or neither)")
        if oce:
            if not 0 <= cls_emb_start_layer < num_layers:
                raise TorchReferenceError(
                    f"cls_emb_start_layer {cls_emb_start_layer} outside 0..{num_layers - 1}"
                )
            self.cls_emb = nn.Parameter(torch.zeros(1, n_cls, embed_dims))
        else:
            self.cls_emb = None
        self.cls_emb_start_layer = cls_emb_start_layer
        self.patch_embed = PatchEmbed(in_channels, embed_dims, patch_size)
        rates = drop_path_rates(drop_path_rate, num_layers)
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dims, num_heads, mlp_ratio * embed_dims, rates[i])
            for i in range(num_layers)
        )
        self.ln1 = nn.LayerNorm(embed_dims, eps=1e-6)

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1, 1 + Hp * Wp, D): stored as is when the length matches, else bicubic-resized."""
        pos = self.pos_embed
        if pos.shape[1] == grid[0] * grid[1] + 1:
            return pos
        cls_pos = pos[:, :1]
        table = pos[:, 1:].reshape(1, self.grid[0], self.grid[1], -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return torch.cat((cls_pos, table.flatten(2).transpose(1, 2)), dim=1)

    def forward(self, img: Tensor) -> ViTOutput:
        """img (B, C, H, W) normalised -> ViTOutput with maps (B, D, ceil(H/p), ceil(W/p))."""
        if img.ndim != 4:
            raise TorchReferenceError(f"expected an NCHW image batch, got shape {tuple(img.shape)}")
        batch = img.shape[0]
        tokens, grid = self.patch_embed(img)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)
        x = x + self.position_embedding(grid)
        n_cls = 0 if self.cls_emb is None else self.cls_emb.shape[1]
        outputs: list[Tensor] = []
        cls_emb = None
        for i, layer in enumerate(self.layers):
            if self.cls_emb is not None and i == self.cls_emb_start_layer:
                x = torch.cat((x, self.cls_emb.expand(batch, -1, -1)), dim=1)
            x = layer(x)
            if i == len(self.layers) - 1:
                x = self.ln1(x)
            out = x[:, 1:]
            if self.cls_emb is not None and i >= self.cls_emb_start_layer:
                cls_emb = out[:, -n_cls:]
                out = out[:, :-n_cls]
            outputs.append(out.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2))
        return ViTOutput(feat=outputs[-1], cls_emb=cls_emb, layer_outputs=outputs)


# --------------------------------------------------------------------------------------------
# Decoder blocks (spec 2.1)
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Segmenter decoder attention: packed qkv [q | k | v], scores scaled after q k^T,
    Dropout on the attention probabilities and after ``proj``."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        batch, n_tok, dim = x.shape
        qkv = self.qkv(x).reshape(batch, n_tok, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(batch, n_tok, dim)
        return self.proj_drop(self.proj(x))


class FeedForward(nn.Module):
    """fc1, exact GELU, Dropout, fc2, Dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm decoder block with PyTorch-default LayerNorms (eps 1e-5)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.mlp = FeedForward(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GroupWiseLinear(nn.Module):
    """One linear classifier per class token: out[b, c] = sum_d W[0, c, d] f[b, c, d] + b[0, c]."""

    def __init__(self, num_class: int, hidden_dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(1, num_class, hidden_dim))
        self.b = nn.Parameter(torch.empty(1, num_class))
        bound = 1.0 / math.sqrt(hidden_dim)
        nn.init.uniform_(self.W, -bound, bound)
        nn.init.uniform_(self.b, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """(B, n_cls, D) -> (B, n_cls)."""
        return (self.W * x).sum(-1) + self.b


def _cosine_masks(
    seq: Tensor, n_cls_tokens: int, proj_patch: Tensor, proj_classes: Tensor
) -> Tensor:
    """Split [patches, classes], project (x @ P), L2-normalise (no eps), cosine (B, HW, k)."""
    patches = seq[:, :-n_cls_tokens] @ proj_patch
    classes = seq[:, -n_cls_tokens:] @ proj_classes
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    return patches @ classes.transpose(1, 2)


def _tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W, C), row-major."""
    return x.flatten(2).permute(0, 2, 1)


def _to_map(masks: Tensor, height: int, width: int) -> Tensor:
    """(B, H * W, N) -> (B, N, H, W)."""
    return masks.reshape(masks.shape[0], height, width, masks.shape[2]).permute(0, 3, 1, 2)


def scatter_to_canvas(masks: Tensor, index: Tensor, n_cls: int) -> Tensor:
    """Inference canvas: (B, n_cls, H, W) filled with -100, masks[:, j] put in channel index[:, j].

    masks (B, k, H, W), index (B, k) int64.
    """
    batch, k, height, width = masks.shape
    canvas = masks.new_ones((batch, n_cls, height, width)) * CANVAS_FILL
    canvas.scatter_(1, index[:, :, None, None].expand(batch, k, height, width), masks)
    return canvas


# --------------------------------------------------------------------------------------------
# Losses and logged metrics (spec section 3)
# --------------------------------------------------------------------------------------------


def class_histogram(label: Tensor, n_cls: int) -> Tensor:
    """(B, H, W) int labels -> (B, n_cls) int64 pixel counts; torch.histc drops 255."""
    hist = label.new_zeros((label.shape[0], n_cls), dtype=torch.int64)
    for i in range(label.shape[0]):
        hist[i] = torch.histc(label[i].float(), bins=n_cls, min=0, max=n_cls - 1).long()
    return hist


def multi_hot_target(label: Tensor, n_cls: int) -> Tensor:
    """(B, H, W) -> (B, n_cls) float: 1 where the class is present (spec 3.1)."""
    return (class_histogram(label, n_cls) > 0).float()


def asymmetric_loss(
    logits: Tensor,
    target: Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    eps: float = 1e-5,
) -> Tensor:
    """ASL (spec 3.2), mean over all B * n_cls entries; gradient flows through the focusing
    weight. logits, target (B, n_cls)."""
    anti_target = 1 - target
    xs_pos = torch.sigmoid(logits)
    xs_neg = 1.0 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = target * torch.log(xs_pos.clamp(min=eps))
    loss = loss + anti_target * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        base = 1 - xs_pos * target - xs_neg * anti_target
        loss = loss * torch.pow(base, gamma_pos * target + gamma_neg * anti_target)
    return -loss.sum() / logits.shape[0] / target.shape[1]


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """BCEWithLogits, mean over B * n_cls (the head default when a config leaves loss_img out)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="mean")


def cross_entropy_all_pixels(logits: Tensor, label: Tensor) -> Tensor:
    """mmseg-0.x CE: per-pixel CE (0 at 255), mean over ALL B * H * W pixels (spec 3.3)."""
    loss = F.cross_entropy(logits, label, reduction="none", ignore_index=IGNORE_INDEX)
    return loss.mean()


def pixel_accuracy(logits: Tensor, label: Tensor) -> Tensor:
    """``decode.acc_seg``: 100 * #(argmax == label) / #all pixels (ignored included). (1,)"""
    pred_label = logits.topk(1, dim=1)[1].transpose(0, 1)
    correct = pred_label.eq(label.unsqueeze(0).expand_as(pred_label))
    return correct[:1].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / label.numel())


def relabel_to_slots(label: Tensor, index: Tensor) -> Tensor:
    """label (B, H, W), index (B, k) -> slot label: j where label == index[b, j], else 255."""
    match = (index[:, :, None, None] == label[:, None]).long()
    found, slot = torch.max(match, dim=1)
    slot[found == 0] = IGNORE_INDEX
    slot[label == IGNORE_INDEX] = IGNORE_INDEX
    return slot


def _finite_mean(values: Tensor) -> Tensor:
    return values[values < float("inf")].mean()


def pixel_recall(hist: Tensor, index: Tensor) -> Tensor:
    """``acc_pix``: per image sum_{c in top-k} hist_c / sum_c hist_c, mean over finite images."""
    recall = torch.gather(hist, 1, index).sum(dim=1) / hist.sum(dim=1)
    if (hist > 0).sum() == 0:
        return recall.new_tensor(1)
    return _finite_mean(recall)


def img_recall(hist: Tensor, index: Tensor) -> Tensor:
    """``acc_img``: per image |top-k ∩ present| / |present|, mean over finite images."""
    present = (hist > 0).float()
    recall = torch.gather(present, 1, index).sum(dim=1) / present.sum(dim=1)
    if (hist > 0).sum() == 0:
        return recall.new_tensor(1)
    return _finite_mean(recall)


def img_accuracy(hist: Tensor, index: Tensor) -> Tensor:
    """``acc_img_accuracy``: per image |top-k ∩ present| / k (precision at k)."""
    present = (hist > 0).float()
    precision = torch.gather(present, 1, index).sum(dim=1) / index.shape[1]
    return _finite_mean(precision)


def _as_label(label: Tensor) -> Tensor:
    """Accept (B, H, W) or mmseg's (B, 1, H, W); return (B, H, W) int64."""
    if label.ndim == 4 and label.shape[1] == 1:
        label = label[:, 0]
    if label.ndim != 3:
        raise TorchReferenceError(
            f"labels must be (B, H, W) or (B, 1, H, W), got {tuple(label.shape)}"
        )
    return label.long()


def _slot_losses(masks: Tensor, index: Tensor, label: Tensor, n_cls: int) -> dict[str, Tensor]:
    """The RankSeg / GT pixel loss and metrics on slot-relabelled labels (spec 3.3, 3.4)."""
    hist = class_histogram(label, n_cls)
    seg_logit = resize_bilinear(masks, label.shape[1:])
    slot_label = relabel_to_slots(label, index)
    return {
        "loss_seg": cross_entropy_all_pixels(seg_logit, slot_label),
        "acc_seg": pixel_accuracy(seg_logit, slot_label),
        "acc_pix": pixel_recall(hist, index),
        "acc_img": img_recall(hist, index),
        "acc_img_accuracy": img_accuracy(hist, index),
    }


# --------------------------------------------------------------------------------------------
# Decode heads (spec section 2)
# --------------------------------------------------------------------------------------------


class MaskTransformerHead(nn.Module):
    """Baseline Segmenter mask transformer (spec 2.2).

    forward(x (B, d_encoder, h, w), cls_emb=None) -> logits (B, n_cls, h, w) in train and eval.
    ``cls_emb`` is the OCE backbone class tokens (B, n_cls, d_model) with
    ``cls_emb_from_backbone=True``; the head then has no ``cls_emb`` parameter.
    """

    def __init__(
        self,
        n_cls: int,
        d_encoder: int,
        n_layers: int = 2,
        n_heads: int = 12,
        d_model: int = 768,
        d_ff: int = 3072,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
        cls_emb_from_backbone: bool = False,
    ) -> None:
        super().__init__()
        self.n_cls = n_cls
        self.cls_emb_from_backbone = cls_emb_from_backbone
        rates = drop_path_rates(drop_path_rate, n_layers)
        if not cls_emb_from_backbone:
            self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        scale = d_model**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff, dropout, rates[i]) for i in range(n_layers)
        )
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = nn.LayerNorm(n_cls)

    def _class_tokens(self, batch: int, cls_emb: Tensor | None) -> Tensor:
        if self.cls_emb_from_backbone:
            if cls_emb is None:
                raise TorchReferenceError(
                    "cls_emb_from_backbone=True but no backbone cls_emb given"
                )
            return cls_emb
        return self.cls_emb.expand(batch, -1, -1)

    def forward(self, x: Tensor, cls_emb: Tensor | None = None) -> Tensor:
        batch, _, height, width = x.shape
        seq = torch.cat((self.proj_dec(_tokens(x)), self._class_tokens(batch, cls_emb)), 1)
        for block in self.blocks:
            seq = block(seq)
        seq = self.decoder_norm(seq)
        masks = _cosine_masks(seq, self.n_cls, self.proj_patch, self.proj_classes)
        return _to_map(self.mask_norm(masks), height, width)

    def forward_test(self, x: Tensor, cls_emb: Tensor | None = None) -> Tensor:
        """(B, n_cls, h, w) logits (the same as forward)."""
        return self.forward(x, cls_emb)

    def losses(self, seg_logits: Tensor, label: Tensor) -> dict[str, Tensor]:
        """``loss_seg`` (CE over all pixels) and ``acc_seg`` for logits (B, n_cls, h, w)."""
        label = _as_label(label)
        seg_logit = resize_bilinear(seg_logits, label.shape[1:])
        return {
            "loss_seg": cross_entropy_all_pixels(seg_logit, label),
            "acc_seg": pixel_accuracy(seg_logit, label),
        }


class RankSegOutput(NamedTuple):
    """RankSeg head training outputs: img_pred (B, n_cls) image-level class logits,
    topk_index (B, k) int64 class ids in rank order (0 = highest), masks (B, k, h, w) after
    ``mask_norm`` (slot j belongs to class topk_index[:, j])."""

    img_pred: Tensor
    topk_index: Tensor
    masks: Tensor


class MaskTransformerRankSegHead(nn.Module):
    """Segmenter + RankSeg head (spec 2.3), with the correct per-image top-k gather for any B.

    forward(x, cls_emb=None): in training mode the triple RankSegOutput(img_pred, topk_index,
    masks); in eval mode the (B, n_cls, h, w) canvas (-100 outside the top-k).
    ``forward_parts`` always returns the triple and ``forward_test`` always the canvas
    (dropout still follows the module's train/eval mode).
    """

    def __init__(
        self,
        n_cls: int,
        d_encoder: int,
        n_layers: int = 3,
        n_heads: int = 12,
        d_model: int = 768,
        d_ff: int = 3072,
        topk_cls: int = 50,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
        downsample: int | None = 8,
        cls_emb_from_backbone: bool = False,
        img_loss: str = "asl",
        gamma_neg: float = 2.0,
        gamma_pos: float = 0.0,
        img_loss_weight: float = 10.0,
    ) -> None:
        super().__init__()
        if img_loss not in ("asl", "bce"):
            raise TorchReferenceError(f"img_loss must be 'asl' or 'bce', got {img_loss!r}")
        if not 0 < topk_cls <= n_cls:
            raise TorchReferenceError(f"topk_cls {topk_cls} outside 1..{n_cls}")
        if n_layers < 2:
            raise TorchReferenceError(f"the RankSeg head needs n_layers >= 2, got {n_layers}")
        self.n_cls = n_cls
        self.topk_cls = topk_cls
        self.downsample = downsample
        self.cls_emb_from_backbone = cls_emb_from_backbone
        self.img_loss = img_loss
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.img_loss_weight = img_loss_weight
        rates = drop_path_rates(drop_path_rate, n_layers)
        if not cls_emb_from_backbone:
            self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        scale = d_model**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff, dropout, rates[i]) for i in range(n_layers)
        )
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.decoder_norm = nn.LayerNorm(d_model)
        self.decoder_norm2 = nn.LayerNorm(d_model)
        self.pooling = nn.AdaptiveAvgPool2d(downsample) if downsample else None
        self.mask_norm = nn.LayerNorm(topk_cls)
        self.ml_fc = GroupWiseLinear(n_cls, d_model)

    def forward_parts(self, x: Tensor, cls_emb: Tensor | None = None) -> RankSegOutput:
        """x (B, d_encoder, h, w) -> RankSegOutput (img_pred, topk_index, masks (B, k, h, w))."""
        batch, _, height, width = x.shape
        if self.cls_emb_from_backbone:
            if cls_emb is None:
                raise TorchReferenceError(
                    "cls_emb_from_backbone=True but no backbone cls_emb given"
                )
            class_tokens = cls_emb
        else:
            class_tokens = self.cls_emb.expand(batch, -1, -1)
        pixel_tokens = self.proj_dec(_tokens(x))
        if self.pooling is not None:
            pooled = self.proj_dec(_tokens(self.pooling(x)))
            seq0 = self.blocks[0](torch.cat((pooled, class_tokens), 1))
        else:
            seq0 = self.blocks[0](torch.cat((pixel_tokens, class_tokens), 1))
            pixel_tokens = seq0[:, : -self.n_cls]
        cls_ml = self.decoder_norm2(seq0[:, -self.n_cls :])
        img_pred = self.ml_fc(cls_ml)
        topk_index = torch.argsort(img_pred, dim=1, descending=True)[:, : self.topk_cls]
        gather_index = topk_index[:, :, None].expand(-1, -1, cls_ml.shape[-1])
        cls_topk = torch.gather(cls_ml, 1, gather_index)
        seq = torch.cat((pixel_tokens, cls_topk), 1)
        for block in self.blocks[1:]:
            seq = block(seq)
        seq = self.decoder_norm(seq)
        masks = _cosine_masks(seq, self.topk_cls, self.proj_patch, self.proj_classes)
        masks = _to_map(self.mask_norm(masks), height, width)
        return RankSegOutput(img_pred, topk_index, masks)

    def forward_test(self, x: Tensor, cls_emb: Tensor | None = None) -> Tensor:
        """(B, n_cls, h, w) inference canvas."""
        parts = self.forward_parts(x, cls_emb)
        return scatter_to_canvas(parts.masks, parts.topk_index, self.n_cls)

    def forward(self, x: Tensor, cls_emb: Tensor | None = None) -> RankSegOutput | Tensor:
        if self.training:
            return self.forward_parts(x, cls_emb)
        return self.forward_test(x, cls_emb)

    def image_loss(self, img_pred: Tensor, target: Tensor) -> Tensor:
        """Unweighted image-level loss of img_pred (B, n_cls) against a multi-hot target."""
        if self.img_loss == "bce":
            return bce_loss(img_pred, target)
        return asymmetric_loss(img_pred, target, self.gamma_neg, self.gamma_pos)

    def losses(self, outputs: RankSegOutput, label: Tensor) -> dict[str, Tensor]:
        """``loss_img`` (x img_loss_weight), ``loss_seg``, ``acc_seg``, ``acc_pix``,
        ``acc_img``, ``acc_img_accuracy`` for label (B, H, W), in the reference order."""
        label = _as_label(label)
        img_pred, topk_index, masks = outputs
        target = multi_hot_target(label, self.n_cls)
        result = {"loss_img": self.image_loss(img_pred, target) * self.img_loss_weight}
        result.update(_slot_losses(masks, topk_index, label, self.n_cls))
        return result


class SelectedLayerNorm(nn.Module):
    """GT head ``mask_norm``: LN over the k selected slots with gamma[:k], beta[:k] by position,
    the UNBIASED variance plus eps inside the sqrt, and beta alone when k == 1."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x (B, N, k) -> (B, N, k)."""
        k = x.shape[-1]
        mean = x.mean(-1, keepdim=True)
        gamma = self.gamma[:k].view(1, 1, k)
        beta = self.beta[:k].view(1, 1, k)
        if k == 1:
            return gamma * (x - mean) + beta.expand(1, x.shape[1], 1)
        std = (x.var(dim=-1, keepdim=True) + self.eps).sqrt()
        return gamma * (x - mean) / std + beta


class GTOutput(NamedTuple):
    """GT head per-image training outputs: gt_index (1, k) ascending class ids present in the
    targets (class 0 when none), masks (1, k, h, w)."""

    gt_index: Tensor
    masks: Tensor


class MaskTransformerRankSegGTHead(nn.Module):
    """Oracle head (spec 2.5): the class tokens are the raw ``cls_emb`` rows of the classes in
    the GT. k varies per image, so like the reference it runs one image at a time.

    forward(x, targets): training mode -> list[GTOutput] (one per image); eval -> canvas
    (B, n_cls, h, w). targets (B, H, W) label maps; only their class sets are used.
    """

    def __init__(
        self,
        n_cls: int,
        d_encoder: int,
        n_layers: int = 2,
        n_heads: int = 12,
        d_model: int = 768,
        d_ff: int = 3072,
        dropout: float = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_cls = n_cls
        rates = drop_path_rates(drop_path_rate, n_layers)
        self.cls_emb = nn.Parameter(torch.randn(1, n_cls, d_model))
        scale = d_model**-0.5
        self.proj_patch = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.proj_classes = nn.Parameter(scale * torch.randn(d_model, d_model))
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff, dropout, rates[i]) for i in range(n_layers)
        )
        self.proj_dec = nn.Linear(d_encoder, d_model)
        self.decoder_norm = nn.LayerNorm(d_model)
        self.mask_norm = SelectedLayerNorm(n_cls)

    def gt_classes(self, target: Tensor) -> Tensor:
        """One label map (H, W) -> (1, k) present class ids, ascending; [[0]] if none."""
        present = class_histogram(target[None].long(), self.n_cls)[0] > 0
        index = torch.nonzero(present).squeeze(-1).unsqueeze(0)
        if index.shape[1] == 0:
            index = index.new_zeros((1, 1))
        return index

    def _forward_one(self, x: Tensor, target: Tensor) -> GTOutput:
        _, _, height, width = x.shape
        gt_index = self.gt_classes(target)
        k = gt_index.shape[1]
        seq = torch.cat((self.proj_dec(_tokens(x)), self.cls_emb[:, gt_index[0]]), 1)
        for block in self.blocks:
            seq = block(seq)
        seq = self.decoder_norm(seq)
        masks = _cosine_masks(seq, k, self.proj_patch, self.proj_classes)
        return GTOutput(gt_index, _to_map(self.mask_norm(masks), height, width))

    def forward_parts(self, x: Tensor, targets: Tensor) -> list[GTOutput]:
        """x (B, d_encoder, h, w), targets (B, H, W) -> one GTOutput per image."""
        targets = _as_label(targets)
        if targets.shape[0] != x.shape[0]:
            raise TorchReferenceError(
                f"targets batch {targets.shape[0]} != feature batch {x.shape[0]}"
            )
        return [self._forward_one(x[i : i + 1], targets[i]) for i in range(x.shape[0])]

    def forward_test(self, x: Tensor, targets: Tensor) -> Tensor:
        """(B, n_cls, h, w) canvas, -100 outside each image's GT classes."""
        parts = self.forward_parts(x, targets)
        return torch.cat([scatter_to_canvas(p.masks, p.gt_index, self.n_cls) for p in parts])

    def forward(self, x: Tensor, targets: Tensor) -> list[GTOutput] | Tensor:
        if self.training:
            return self.forward_parts(x, targets)
        return self.forward_test(x, targets)

    def losses(self, outputs: list[GTOutput], label: Tensor) -> dict[str, Tensor]:
        """Per-image slot CE and metrics, averaged over the images (equal-size crops make this
        the batched mean, as with 1 image per GPU and DDP averaging)."""
        label = _as_label(label)
        per_image = [
            _slot_losses(out.masks, out.gt_index, label[i : i + 1], self.n_cls)
            for i, out in enumerate(outputs)
        ]
        return {key: torch.stack([d[key] for d in per_image]).mean(0) for key in per_image[0]}


# --------------------------------------------------------------------------------------------
# Segmentor (spec 4.1)
# --------------------------------------------------------------------------------------------


def rescale_size(
    height: int, width: int, img_scale: Sequence[int], ratio: float
) -> tuple[int, int]:
    """mmcv keep-ratio rescale of an (H, W) image to img_scale * ratio -> new (H, W)."""
    scale_w, scale_h = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
    long_edge, short_edge = max(scale_w, scale_h), min(scale_w, scale_h)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * float(factor) + 0.5), int(width * float(factor) + 0.5)


class Segmenter(nn.Module):
    """EncoderDecoder(backbone, neck=last map, decode_head) with the reference inference.

    Child names ``backbone`` and ``decode_head`` give the mmseg state-dict keys.
    """

    def __init__(self, backbone: VisionTransformer, decode_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.n_cls = decode_head.n_cls

    @property
    def head_type(self) -> str:
        if isinstance(self.decode_head, MaskTransformerRankSegHead):
            return "rankseg"
        if isinstance(self.decode_head, MaskTransformerRankSegGTHead):
            return "gt"
        return "mask"

    def extract_feat(self, img: Tensor) -> tuple[Tensor, Tensor | None]:
        """img (B, 3, H, W) -> (feat (B, D, Hp, Wp), OCE class tokens (B, n_cls, D) or None)."""
        out = self.backbone(img)
        return out.feat, out.cls_emb

    def _head_input(self, img: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
        feat, cls_emb = self.extract_feat(img)
        if self.head_type == "gt":
            if targets is None:
                raise TorchReferenceError("the GT head needs targets (B, H, W) label maps")
            return feat, targets
        return feat, cls_emb

    def decode_test(self, img: Tensor, targets: Tensor | None = None) -> Tensor:
        """Head inference output at feature resolution (B, n_cls, Hp, Wp)."""
        feat, extra = self._head_input(img, targets)
        return self.decode_head.forward_test(feat, extra)

    def encode_decode(self, img: Tensor, targets: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) -> logits (B, n_cls, H, W), bilinear from the feature map."""
        return resize_bilinear(self.decode_test(img, targets), img.shape[2:])

    def slide_logits(
        self,
        img: Tensor,
        crop_size: int | Sequence[int],
        stride: int | Sequence[int],
        out_size: Sequence[int] | None = None,
        targets: Tensor | None = None,
    ) -> Tensor:
        """Window logits summed on a canvas, divided by the count map, then resized to
        out_size (default: the input size). (B, n_cls, *out_size). targets (GT head): the
        whole-image labels, passed unchanged to every window as the reference does."""
        h_crop, w_crop = _pair(crop_size)
        h_stride, w_stride = _pair(stride)
        batch, _, h_img, w_img = img.shape
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((batch, self.n_cls, h_img, w_img))
        count = img.new_zeros((batch, 1, h_img, w_img))
        for h_idx in range(h_grids):
            for w_idx in range(w_grids):
                y2 = min(h_idx * h_stride + h_crop, h_img)
                x2 = min(w_idx * w_stride + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                crop_logit = self.encode_decode(img[:, :, y1:y2, x1:x2], targets)
                preds += F.pad(crop_logit, (x1, w_img - x2, y1, h_img - y2))
                count[:, :, y1:y2, x1:x2] += 1
        preds = preds / count
        return resize_bilinear(preds, out_size if out_size is not None else (h_img, w_img))

    def slide_inference(
        self,
        img: Tensor,
        crop_size: int | Sequence[int],
        stride: int | Sequence[int],
        out_size: Sequence[int] | None = None,
        flip: bool = False,
        targets: Tensor | None = None,
    ) -> Tensor:
        """mmseg ``inference`` in slide mode with rescale: softmax of ``slide_logits``,
        flipped back horizontally when ``flip`` (img is then the flipped image).
        -> probabilities (B, n_cls, *out_size)."""
        probs = F.softmax(self.slide_logits(img, crop_size, stride, out_size, targets), dim=1)
        return probs.flip(dims=(3,)) if flip else probs

    def aug_test(
        self,
        img: Tensor,
        ratios: Sequence[float] = AUG_TEST_RATIOS,
        flip: bool = True,
        img_scale: Sequence[int] = (2048, 512),
        crop_size: int | Sequence[int] = 512,
        stride: int | Sequence[int] = 512,
        targets: Tensor | None = None,
    ) -> Tensor:
        """ms(+flip) test: for each ratio the (normalised) original image is keep-ratio
        resized to img_scale * ratio (bilinear, align_corners=False), optionally flipped,
        slide-inferred, resized back to the original size, softmaxed and un-flipped; the
        probabilities are averaged. img (B, 3, H, W) -> (B, n_cls, H, W).

        The reference resizes the uint8 image with cv2 before normalising; resizing the
        normalised float image is the same interpolation without the uint8 rounding.
        """
        height, width = img.shape[2:]
        total = None
        count = 0
        for ratio in ratios:
            new_size = rescale_size(height, width, img_scale, ratio)
            scaled = img if new_size == (height, width) else resize_bilinear(img, new_size)
            for flipped in (False, True) if flip else (False,):
                view = scaled.flip(dims=(3,)) if flipped else scaled
                probs = self.slide_inference(
                    view, crop_size, stride, (height, width), flipped, targets
                )
                total = probs if total is None else total + probs
                count += 1
        return total / count

    def forward_train(self, img: Tensor, label: Tensor) -> dict[str, Tensor]:
        """Losses and logged metrics with the reference keys: ``decode.loss_seg``,
        ``decode.acc_seg`` (+ RankSeg ``decode.loss_img``, ``decode.acc_pix``,
        ``decode.acc_img``, ``decode.acc_img_accuracy``; GT head the same without loss_img)
        and ``loss`` = the sum of the entries whose key contains "loss".

        The head's training outputs are used whatever the module mode; dropout and drop-path
        follow the mode (call .eval() for deterministic numerics). label (B, H, W) int64.
        """
        label = _as_label(label)
        feat, extra = self._head_input(img, label)
        head = self.decode_head
        if self.head_type == "mask":
            outputs = head.forward(feat, extra)
        else:
            outputs = head.forward_parts(feat, extra)
        losses = {f"decode.{k}": v for k, v in head.losses(outputs, label).items()}
        losses["loss"] = sum(v for k, v in losses.items() if "loss" in k)
        return losses


# --------------------------------------------------------------------------------------------
# Construction from configs and state dicts (spec 6.2)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SegmenterConfig:
    """Sizes of a reference model. Defaults: ADE20K ViT-B/16 + RankSeg at 512 (spec 1.1, 2)."""

    head: str = "rankseg"
    img_size: tuple[int, int] = (512, 512)
    patch_size: int = 16
    in_channels: int = 3
    embed_dims: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    oce: bool = False
    cls_emb_start_layer: int | None = None
    n_cls: int = 150
    d_model: int = 768
    head_layers: int = 3
    head_heads: int = 12
    d_ff: int = 3072
    dropout: float = 0.1
    head_drop_path_rate: float = 0.0
    topk_cls: int = 50
    downsample: int | None = 8
    img_loss: str = "asl"
    gamma_neg: float = 2.0
    gamma_pos: float = 0.0
    img_loss_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.head not in HEAD_TYPES:
            raise TorchReferenceError(f"head must be one of {HEAD_TYPES}, got {self.head!r}")
        if self.oce and self.head == "gt":
            raise TorchReferenceError("the GT head has no OCE variant")


def build_segmenter(config: SegmenterConfig) -> Segmenter:
    """A Segmenter with PyTorch-default / reference-construction parameters for ``config``."""
    start = None
    if config.oce:
        start = (
            config.cls_emb_start_layer
            if config.cls_emb_start_layer is not None
            else config.num_layers - 1
        )
    backbone = VisionTransformer(
        img_size=config.img_size,
        patch_size=config.patch_size,
        embed_dims=config.embed_dims,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        drop_path_rate=config.drop_path_rate,
        n_cls=config.n_cls if config.oce else None,
        cls_emb_start_layer=start,
        in_channels=config.in_channels,
    )
    common = dict(
        n_cls=config.n_cls,
        d_encoder=config.embed_dims,
        n_layers=config.head_layers,
        n_heads=config.head_heads,
        d_model=config.d_model,
        d_ff=config.d_ff,
        dropout=config.dropout,
        drop_path_rate=config.head_drop_path_rate,
    )
    if config.head == "mask":
        head: nn.Module = MaskTransformerHead(**common, cls_emb_from_backbone=config.oce)
    elif config.head == "rankseg":
        head = MaskTransformerRankSegHead(
            **common,
            topk_cls=config.topk_cls,
            downsample=config.downsample,
            cls_emb_from_backbone=config.oce,
            img_loss=config.img_loss,
            gamma_neg=config.gamma_neg,
            gamma_pos=config.gamma_pos,
            img_loss_weight=config.img_loss_weight,
        )
    else:
        head = MaskTransformerRankSegGTHead(**common)
    return Segmenter(backbone, head)


def _require(state_dict: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in state_dict:
        raise TorchReferenceError(f"state dict has no key {key!r}; is it an mmseg Segmenter?")
    return state_dict[key]


def _count_indexed(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if not found:
        raise TorchReferenceError(f"state dict has no keys starting with {prefix!r}<i>.")
    return max(found) + 1


def infer_head_type(state_dict: Mapping[str, Tensor]) -> str:
    """'rankseg' (has ml_fc.W), 'gt' (has mask_norm.gamma) or 'mask'."""
    if "decode_head.ml_fc.W" in state_dict:
        return "rankseg"
    if "decode_head.mask_norm.gamma" in state_dict:
        return "gt"
    return "mask"


def config_from_state_dict(
    state_dict: Mapping[str, Tensor],
    num_heads: int | None = None,
    head_heads: int | None = None,
    **overrides: Any,
) -> SegmenterConfig:
    """Sizes from the tensor shapes. Head counts are not in the shapes: they default to
    width // 64 (every released config has head dim 64); the small fixtures need 2.

    ``overrides`` set the other SegmenterConfig fields (dropout, drop_path_rate, img_loss, ...).
    """
    cls_token = _require(state_dict, "backbone.cls_token")
    pos_embed = _require(state_dict, "backbone.pos_embed")
    proj = _require(state_dict, "backbone.patch_embed.projection.weight")
    embed_dims, in_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    if cls_token.shape[-1] != embed_dims:
        raise TorchReferenceError("backbone.cls_token width differs from the patch projection")
    grid = math.isqrt(pos_embed.shape[1] - 1)
    if grid * grid != pos_embed.shape[1] - 1:
        raise TorchReferenceError(
            f"backbone.pos_embed {tuple(pos_embed.shape)} is not 1 + a square grid; pass "
            "img_size=(H, W) in overrides"
        )
    hidden = _require(state_dict, "backbone.layers.0.ffn.layers.0.0.weight").shape[0]
    head = infer_head_type(state_dict)
    d_model = _require(state_dict, "decode_head.proj_patch").shape[0]
    if "backbone.cls_emb" in state_dict:
        n_cls = state_dict["backbone.cls_emb"].shape[1]
    else:
        n_cls = _require(state_dict, "decode_head.cls_emb").shape[1]
    fields: dict[str, Any] = dict(
        head=head,
        img_size=(grid * patch_size, grid * patch_size),
        patch_size=patch_size,
        in_channels=in_channels,
        embed_dims=embed_dims,
        num_layers=_count_indexed(state_dict, "backbone.layers."),
        num_heads=num_heads or max(embed_dims // 64, 1),
        mlp_ratio=hidden // embed_dims,
        oce="backbone.cls_emb" in state_dict,
        n_cls=n_cls,
        d_model=d_model,
        head_layers=_count_indexed(state_dict, "decode_head.blocks."),
        head_heads=head_heads or num_heads or max(d_model // 64, 1),
        d_ff=_require(state_dict, "decode_head.blocks.0.mlp.fc1.weight").shape[0],
    )
    if head == "rankseg":
        fields["topk_cls"] = _require(state_dict, "decode_head.mask_norm.weight").shape[0]
    fields.update(overrides)
    return SegmenterConfig(**fields)


def build_from_state_dict(
    state_dict: Mapping[str, Tensor],
    num_heads: int | None = None,
    head_heads: int | None = None,
    **overrides: Any,
) -> Segmenter:
    """A Segmenter sized from ``state_dict`` with it loaded (strict=True), in eval mode."""
    config = config_from_state_dict(state_dict, num_heads, head_heads, **overrides)
    model = build_segmenter(config)
    missing, unexpected = _key_mismatch(model, state_dict)
    if missing or unexpected:
        raise TorchReferenceError(
            f"state dict does not fit {config.head!r} model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()


def _key_mismatch(model: nn.Module, state_dict: Mapping[str, Tensor]) -> tuple[list, list]:
    expected = set(model.state_dict())
    given = set(state_dict)
    return sorted(expected - given), sorted(given - expected)


def load_checkpoint_state_dict(path: str | pathlib.Path) -> dict[str, Tensor]:
    """``torch.load(path, weights_only=True)['state_dict']`` of an mmcv checkpoint."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise TorchReferenceError(f"{path}: not an mmcv checkpoint (no 'state_dict' entry)")
    return dict(checkpoint["state_dict"])


def randomize_parameters_(model: nn.Module, seed: int, noise: float = 0.1) -> nn.Module:
    """Seeded, non-trivial parameters for parity tests of bigger models: weights
    N(0, 1/fan_in), LayerNorm scales 1 + noise * N, biases / tokens noise * N(0, 1) (so a
    dropped bias or swapped norm shows up). In place; returns the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            draw = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            module_path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module_path) if module_path else model
            is_norm = isinstance(owner, (nn.LayerNorm, SelectedLayerNorm))
            if is_norm and leaf in ("weight", "gamma"):
                param.copy_(1.0 + noise * draw)
            elif param.ndim <= 1 or leaf in ("b", "cls_token", "pos_embed", "cls_emb"):
                param.copy_(noise * draw)
            elif leaf == "W":
                param.copy_(draw * param.shape[-1] ** -0.5)
            else:
                fan_in = param.numel() // param.shape[0]
                param.copy_(draw * fan_in**-0.5)
    return model
