"""The one fallback palette for a class set without colours (a custom class count, a folder
dataset without a palette): export, predict, the figures and the folder reader share it."""

from __future__ import annotations

import cv2
import numpy as np


def generic_palette(n_cls: int, seed: int = 0) -> np.ndarray:
    """A deterministic (n_cls, 3) uint8 palette of well-separated colours (golden-angle hues)."""
    hues = (np.arange(n_cls) * 137.508 + seed) % 360
    sat = 0.55 + 0.4 * ((np.arange(n_cls) * 7) % 5) / 4
    val = 0.65 + 0.35 * ((np.arange(n_cls) * 3) % 4) / 3
    hsv = np.stack([hues / 2, sat * 255, val * 255], axis=-1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]
