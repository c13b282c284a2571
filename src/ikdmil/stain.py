"""Stain statistics of H&E tissue: measured on the training images, stored in the model file, compared at predict.

Space: haematoxylin / eosin / DAB concentrations from `skimage.color.rgb2hed` (colour deconvolution
with the Ruifrok-Johnston H&E-DAB matrix, a linear map of the optical density -log(RGB)). In H&E the
third channel is the residual: colour that neither stain explains (a yellow or brown cast).

Tissue pixels: HSV saturation above `TISSUE_SATURATION` (glass is grey, stain is coloured), inside the
tissue mask where there is one. Images with fewer than `MIN_TISSUE_FRACTION` tissue pixels are left out.

Statistics (`StainStats`, JSON under ``"stain"`` in the model file's metadata): per channel the pooled
pixel `mean` and `std` over every tissue pixel, and `spread`, the standard deviation of the per-image
means: how much the average stain varies from one training image to the next.

Distance (`stain_distance`): per channel ``z = |slide mean - training mean| / scale`` with ``scale =
max(spread, std / 10)`` (the floor keeps near-identical training images from flagging every slide);
the slide is far from the training data when the largest z exceeds `STAIN_Z_WARN` (3: the slide's
average stain lies beyond three training-image standard deviations). At predict the slide's mean is
taken on its thumbnail, which averages fine texture: that lowers the mean H by about a tenth at 8x
coarser than the training images (synthetic tissue), 0.3 of a typical spread, well inside the threshold.

`scale_stains` changes the staining of an image (tests, `benchmarks/stain.py`). A later stain
normalisation (Reinhard, Macenko) can keep its reference next to these fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ikdmil.errors import IkdmilError

SPACE = "skimage-rgb2hed"
CHANNELS = ("haematoxylin", "eosin", "residual")
TISSUE_SATURATION = 0.05  # the lower clamp of the tissue detector's threshold (`ikdmil.slide.tissue`)
MIN_TISSUE_FRACTION = 0.01
MIN_IMAGES = 2  # a spread needs at least two images
STAIN_Z_WARN = 3.0
SCALE_FLOOR = 0.1  # scale >= this x the pixel std
MAX_IMAGES = 512  # training images measured (evenly spaced), each on a stride-2 pixel grid


@dataclass(frozen=True)
class StainStats:
    """Per-channel (H, E, residual) stain statistics of tissue pixels; see the module docstring."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    spread: tuple[float, float, float]  # std of the per-image means (0 for a single slide)
    images: int
    pixels: int

    def to_meta(self) -> dict:
        return {"space": SPACE, "channels": list(CHANNELS), "tissue_saturation": TISSUE_SATURATION,
                "mean": _rounded(self.mean), "std": _rounded(self.std), "spread": _rounded(self.spread),
                "images": self.images, "pixels": self.pixels}


def _floats(values) -> tuple[float, float, float]:
    return tuple(float(v) for v in values)


def _rounded(values) -> list[float]:
    return [round(float(v), 6) for v in values]


def scale_stains(rgb: np.ndarray, haematoxylin: float = 1.0, eosin: float = 1.0) -> np.ndarray:
    """uint8 RGB with the haematoxylin and eosin concentrations scaled (another lab's staining; glass stays)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    hed[..., 0] *= haematoxylin
    hed[..., 1] *= eosin
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


def tissue_hed(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) float HED values of the tissue pixels of a uint8 RGB image (within `mask` when given)."""
    from skimage.color import rgb2hed

    from ikdmil.slide.tissue import saturation

    keep = saturation(rgb) > TISSUE_SATURATION
    if mask is not None:
        keep &= mask
    pixels = rgb[keep]
    if len(pixels) == 0:
        return np.zeros((0, 3), np.float64)
    return rgb2hed(pixels[:, None, :])[:, 0, :]


def training_stats(images: np.ndarray, max_images: int = MAX_IMAGES) -> StainStats | None:
    """Stain statistics of (N, S, S, 3) uint8 training images (memory-mapped is fine); None when fewer
    than `MIN_IMAGES` of them hold tissue."""
    n = len(images)
    picks = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int)) if n else []
    means, total, total_sq, count = [], np.zeros(3), np.zeros(3), 0
    for i in picks:
        img = np.asarray(images[i][::2, ::2])
        hed = tissue_hed(img)
        if len(hed) < max(1.0, MIN_TISSUE_FRACTION * img.shape[0] * img.shape[1]):
            continue
        means.append(hed.mean(0))
        total += hed.sum(0)
        total_sq += (hed ** 2).sum(0)
        count += len(hed)
    if len(means) < MIN_IMAGES:
        return None
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return StainStats(_floats(mean), _floats(std), _floats(np.std(means, axis=0)), len(means), count)


def slide_stats(rgb: np.ndarray, mask: np.ndarray | None) -> StainStats | None:
    """Stain statistics of one image's tissue (a slide thumbnail and its tissue mask); None without tissue."""
    hed = tissue_hed(rgb, mask)
    if len(hed) == 0:
        return None
    return StainStats(_floats(hed.mean(0)), _floats(hed.std(0)), (0.0, 0.0, 0.0), 1, len(hed))


def from_meta(meta: dict, path: str | Path) -> StainStats | None:
    """The model file's stain statistics; None when it has none (older files); a damaged entry is an error."""
    entry = meta.get("stain")
    if entry is None:
        return None
    try:
        if entry["space"] != SPACE:
            raise ValueError(f"space {entry['space']!r}")
        values = [tuple(float(v) for v in entry[k]) for k in ("mean", "std", "spread")]
        if any(len(v) != 3 or not all(np.isfinite(v)) for v in values) or min(values[1] + values[2]) < 0:
            raise ValueError("values")
        return StainStats(*values, int(entry["images"]), int(entry["pixels"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise IkdmilError(f"{path}: damaged stain statistics in the model file's metadata ({exc}); copy the file "
                          "again or retrain") from None


def stain_distance(slide: StainStats, reference: StainStats) -> list[float]:
    """Per-channel z of the slide's mean stain against the training data's (see the module docstring)."""
    z = []
    for m, ref, std, spread in zip(slide.mean, reference.mean, reference.std, reference.spread):
        scale = max(spread, SCALE_FLOOR * std, 1e-9)
        z.append(abs(m - ref) / scale)
    return z
