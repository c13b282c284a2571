"""Overlay images: prediction outline (and truth outline when known) drawn on the H&E image; slide
overlays with the tissue and tumour outlines as anti-aliased lines and a legend."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PRED_COLOUR = (0, 220, 0)  # green: predicted tumour
TRUTH_COLOUR = (30, 90, 255)  # blue: annotated tumour
TISSUE_COLOUR = (0, 170, 255)  # light blue: detected (or given) tissue on slide overlays


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


#: what the colours of a slide's overlay.png mean (written into its summary.json and the report)
SLIDE_OVERLAY_LEGEND = {"tissue outline": hex_colour(TISSUE_COLOUR), "tumour outline and tint": hex_colour(PRED_COLOUR)}


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


def contour_lines(mask: np.ndarray, scale: tuple[float, float] = (1.0, 1.0)) -> list[np.ndarray]:
    """Outlines of a bool mask as (N, 2) arrays of (x, y) on a grid `scale` (x, y) times coarser than the mask's.

    Cell centres map onto cell centres (``x' = (x + 0.5) / scale - 0.5``); the mask is padded, so regions
    touching its border are closed too.
    """
    from skimage.measure import find_contours

    if not mask.any():
        return []
    lines = []
    for rc in find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        xy = rc[:, ::-1] - 1.0
        lines.append((xy + 0.5) / np.asarray(scale, np.float64) - 0.5)
    return lines


def draw_lines(image: np.ndarray, lines: list[np.ndarray], colour: tuple[int, int, int], width: int) -> np.ndarray:
    """uint8 RGB copy of `image` with each polyline drawn in `colour`, `width` px wide."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    for xy in lines:
        if len(xy) >= 2:
            draw.line([tuple(p) for p in xy.tolist()], fill=tuple(colour), width=width, joint="curve")
    return np.asarray(img).copy()


def draw_legend(image: np.ndarray, items: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """uint8 RGB copy of `image` with a small white box in the top-left corner: a coloured bar per label."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    row = 16
    width = 30 + max(int(draw.textlength(text, font=font)) for text, _ in items)
    draw.rectangle([2, 2, 8 + width, 6 + row * len(items)], fill=(255, 255, 255), outline=(120, 120, 120))
    for i, (text, colour) in enumerate(items):
        y = 6 + i * row
        draw.rectangle([8, y + 4, 28, y + 8], fill=tuple(colour))
        draw.text((34, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(img).copy()


def slide_overlay(thumb: np.ndarray, tumour: np.ndarray, tissue_lines: list[np.ndarray],
                  tumour_lines: list[np.ndarray], alpha: float = 0.25) -> np.ndarray:
    """A slide thumbnail with the tumour tinted, the tissue outline (blue) and the tumour outline (green)
    drawn over it, and a legend saying which is which."""
    out = thumb.astype(np.float32)
    out[tumour] = (1 - alpha) * out[tumour] + alpha * np.array(PRED_COLOUR, np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    width = max(2, round(max(thumb.shape[:2]) / 700))
    out = draw_lines(out, tissue_lines, TISSUE_COLOUR, width)
    out = draw_lines(out, tumour_lines, PRED_COLOUR, width)
    if min(thumb.shape[:2]) >= 64:  # no room for a legend on a tiny image
        out = draw_legend(out, [("tissue outline", TISSUE_COLOUR), ("tumour outline", PRED_COLOUR)])
    return out
