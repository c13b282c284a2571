"""Overlay images: prediction outline (and truth outline when known) drawn on the H&E image."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PRED_COLOUR = (0, 220, 0)  # green: predicted tumour
TRUTH_COLOUR = (30, 90, 255)  # blue: annotated tumour


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=1, border_value=0)


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None, alpha: float = 0.25) -> np.ndarray:
    """uint8 RGB: predicted region tinted green with a green outline, truth outline in blue."""
    out = image.astype(np.float32).copy()
    tint = np.array(PRED_COLOUR, np.float32)
    out[pred] = (1 - alpha) * out[pred] + alpha * tint
    if truth is not None:
        out[ndimage.binary_dilation(_outline(truth))] = TRUTH_COLOUR
    out[_outline(pred)] = PRED_COLOUR
    return out.clip(0, 255).astype(np.uint8)


def heatmap(prob: np.ndarray) -> np.ndarray:
    """Probability in [0,1] as a blue-to-red uint8 RGB image (no matplotlib needed)."""
    p = np.clip(prob, 0, 1)
    r = np.clip(2 * p, 0, 1)
    b = np.clip(2 * (1 - p), 0, 1)
    g = 1 - np.abs(2 * p - 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    h = max(i.shape[0] for i in images)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(im)
    return np.concatenate(parts, axis=1)
