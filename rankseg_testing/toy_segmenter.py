"""A tiny deterministic segmenter in JAX and in torch, and the reference inference in torch.

It stands in for the real model in the evaluation tests. Like the ViT it depends on the window
size and on positions within the window: the window is zero-padded to a multiple of 16, cut into
16x16 patches, each mapped linearly to class logits plus a term that depends on the patch's
place in the grid (so a window's output changes with its size), and the grid map is resized
bilinearly (align_corners=False) to the unpadded window size. The RankSeg variant picks the
top-k classes of the window's mean patch score and fills the others with -100 before the
resize, as the RankSeg head does. The torch functions follow mmseg's `slide_inference`,
`inference` and `aug_test` as rankseg-spec section 4.1 describes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

PATCH = 16
FILL = -100.0


def toy_params(n_cls: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Fixed random weights: a (768, n_cls) patch map, a bias and two grid-position terms."""
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((3 * PATCH * PATCH, n_cls)) * 0.05).astype(np.float32),
        "b": rng.standard_normal(n_cls).astype(np.float32),
        "py": rng.standard_normal(n_cls).astype(np.float32),
        "px": rng.standard_normal(n_cls).astype(np.float32),
    }


def _grid_terms(gh: int, gw: int, params, xp):
    gy = xp.cos(np.pi * (np.arange(gh, dtype=np.float32) + 0.5) / gh).astype(np.float32)
    gx = xp.sin(np.pi * (np.arange(gw, dtype=np.float32) + 0.5) / gw).astype(np.float32)
    return gy, gx


def jax_encode_decode(params, windows: jax.Array, topk: int = 0) -> jax.Array:
    """(N, h, w, 3) float32 -> logits (N, h, w, C); topk > 0 gives the RankSeg-style output."""
    n, h, w, _ = windows.shape
    gh, gw = -(-h // PATCH), -(-w // PATCH)
    x = jnp.pad(windows, ((0, 0), (0, gh * PATCH - h), (0, gw * PATCH - w), (0, 0)))
    x = x.reshape(n, gh, PATCH, gw, PATCH, 3).transpose(0, 1, 3, 5, 2, 4)
    x = x.reshape(n, gh, gw, 3 * PATCH * PATCH)
    gy, gx = _grid_terms(gh, gw, params, np)
    feat = jnp.einsum("nyxd,dc->nyxc", x, params["w"], precision="highest") + params["b"]
    feat = feat + gy[:, None, None] * params["py"] + gx[None, :, None] * params["px"]
    if topk:
        score = feat.mean(axis=(1, 2))
        _, index = jax.lax.top_k(score, topk)
        keep = jnp.any(jax.nn.one_hot(index, feat.shape[-1], dtype=bool), axis=1)
        feat = jnp.where(keep[:, None, None, :], feat, FILL)
    return jax.image.resize(feat, (n, h, w, feat.shape[-1]), "linear", antialias=False)


def torch_encode_decode(params, img, topk: int = 0):
    """The same model in torch: img (N, 3, h, w) -> logits (N, C, h, w)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = img.shape
    gh, gw = -(-h // PATCH), -(-w // PATCH)
    x = F.pad(img, (0, gw * PATCH - w, 0, gh * PATCH - h))
    x = x.reshape(n, 3, gh, PATCH, gw, PATCH).permute(0, 2, 4, 1, 3, 5)
    x = x.reshape(n, gh, gw, 3 * PATCH * PATCH).double()
    gy, gx = _grid_terms(gh, gw, params, np)
    t = {k: torch.from_numpy(v) for k, v in params.items()}
    feat = (x @ t["w"].double()).float() + t["b"]
    feat = feat + torch.from_numpy(gy)[:, None, None] * t["py"]
    feat = feat + torch.from_numpy(gx)[None, :, None] * t["px"]
    feat = feat.permute(0, 3, 1, 2)  # (N, C, gh, gw)
    if topk:
        score = feat.mean(dim=(2, 3))
        index = torch.argsort(score, dim=1, descending=True)[:, :topk]
        index = index[:, :, None, None].expand(-1, -1, gh, gw)
        feat = torch.full_like(feat, FILL).scatter(1, index, feat.gather(1, index))
    return F.interpolate(feat, size=(h, w), mode="bilinear", align_corners=False)


def torch_slide_inference(model, img, crop: Sequence[int], stride: Sequence[int], n_cls: int):
    """mmseg `EncoderDecoder.slide_inference` without the rescale: averaged logits (1, C, H, W)."""
    import torch.nn.functional as F

    h_stride, w_stride = stride
    h_crop, w_crop = crop
    batch, _, h_img, w_img = img.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch, n_cls, h_img, w_img))
    count_mat = img.new_zeros((batch, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * h_stride, w_idx * w_stride
            y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_logit = model(img[:, :, y1:y2, x1:x2])
            preds += F.pad(crop_logit, (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
            count_mat[:, :, y1:y2, x1:x2] += 1
    return preds / count_mat


def torch_inference(model, img, ori_shape, crop, stride, n_cls, flip=False, mode="slide"):
    """mmseg `EncoderDecoder.inference(rescale=True)`: probabilities (1, C, H0, W0)."""
    import torch.nn.functional as F

    if mode == "slide":
        logits = torch_slide_inference(model, img, crop, stride, n_cls)
    else:
        logits = model(img)
    logits = F.interpolate(logits, size=tuple(ori_shape), mode="bilinear", align_corners=False)
    out = F.softmax(logits, dim=1)
    return out.flip(dims=(3,)) if flip else out


def torch_aug_test(model, image_u8, scales, flip, mean, std, crop, stride, n_cls):
    """mmseg `aug_test` on one uint8 RGB image: averaged probabilities (C, H0, W0), pred."""
    import cv2
    import torch

    from rankseg_jax.inference import rescale_size

    ori = image_u8.shape[:2]
    total, count = None, 0
    for scale in scales:
        h, w = rescale_size(ori[0], ori[1], scale)
        resized = cv2.resize(image_u8, (w, h), interpolation=cv2.INTER_LINEAR)
        for flipped in (False, True) if flip else (False,):
            view = resized[:, ::-1] if flipped else resized
            norm = np.ascontiguousarray(view).astype(np.float32)  # mmcv imnormalize
            cv2.subtract(norm, np.float64(np.reshape(mean, (1, -1))), norm)
            cv2.multiply(norm, 1 / np.float64(np.reshape(std, (1, -1))), norm)
            img = torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))[None]
            probs = torch_inference(model, img, ori, crop, stride, n_cls, flip=flipped)
            total = probs if total is None else total + probs
            count += 1
    total = total / count
    return total[0].numpy(), total.argmax(dim=1)[0].numpy()
