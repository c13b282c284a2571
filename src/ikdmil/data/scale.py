"""The one scale a model sees its images at, and the square windows (crops, tiles) cut from them.

Images are rescaled *isotropically* (the same factor in x and y, never squeezed to a square) to the
model's resolution, `Scale.mpp` µm per model pixel: an image of `Sample.mpp` µm/px is rescaled by
`Sample.mpp / Scale.mpp`, so images of different resolutions in one dataset all end up at the same
µm/px. Training then takes square crops of `input_size` px and evaluation tiles the whole rescaled
image (`ikdmil.data.dataset`, `ikdmil.engine.evaluate`).

Which scale (`choose_scale`, from the *training* split):
- `model_mpp` given (> 0) and the data has mpp: that resolution;
- else, data with mpp: the resolution at which the median training image's short side is
  `input_size` px, so a crop covers about what a whole (squeezed) image covered before. GlaS at
  256 px: 0.62 x 522 / 256 = 1.26 µm/px (775 x 522 images become 380 x 256);
- data without mpp: the resolution is unknown (`mpp` 0, or `model_mpp` stored as given) and images
  are rescaled by one pixel factor, the one that makes the median short side `input_size` px.
The manifest's mpp column must be filled for all images or none.

The model file stores `mpp` (when known) and `scale` (the pixel factor, when the data had no mpp), so
`evaluate` rescales new data exactly as training did (`Scale.from_meta`) and `predict` reads slides at
the model's µm/px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ikdmil.data.manifest import Sample
from ikdmil.errors import IkdmilError
from ikdmil.io import open_header


@dataclass(frozen=True)
class Scale:
    """µm per model px (`mpp`, 0 = unknown) or, for data without mpp, model px per image px (`factor`)."""

    mpp: float
    factor: float = 0.0
    rule: str = ""

    def of(self, sample: Sample) -> float:
        """Model px per image px for `sample` (the same in x and y)."""
        if self.mpp > 0 and sample.mpp:
            return sample.mpp / self.mpp
        if self.factor > 0:
            return self.factor
        raise IkdmilError(f"{sample.image}: no mpp in the manifest, but the model's scale is in µm/px; fill the "
                          "manifest's mpp column (µm/px of the image)")

    def key(self) -> str:
        """Part of the preprocessing cache key: a cache built at another scale is never reused."""
        return f"m{self.mpp:.6g}-f{self.factor:.6g}"

    def meta(self) -> dict:
        """Model-file metadata: `mpp` when known (read by predict), `scale` when the data had no mpp."""
        out = {"mpp": round(self.mpp, 6)} if self.mpp > 0 else {}
        if self.factor > 0:
            out["scale"] = round(self.factor, 6)
        return out

    def describe(self) -> str:
        if self.factor > 0 and self.mpp > 0:
            return f"images x {self.factor:.4g} (data without mpp; model_mpp {self.mpp:g} µm/px stored as given)"
        if self.factor > 0:
            return f"images x {self.factor:.4g}, µm/px unknown (the manifest has no mpp)"
        return f"{self.mpp:.4g} µm/px ({self.rule})"


def image_size(sample: Sample) -> tuple[int, int]:
    """(height, width) of a sample's image from its header (nothing is decoded)."""
    width, height = open_header(sample.image)
    return height, width


def _mpp_state(samples: list[Sample]) -> bool:
    """Whether the samples carry mpp; an error when only some do."""
    have = [s.mpp is not None for s in samples]
    if any(have) and not all(have):
        missing = next(s for s in samples if s.mpp is None)
        raise IkdmilError(f"{missing.image}: has no mpp in the manifest while other images do; fill the mpp column "
                          "for every image or for none")
    return bool(have) and all(have)


def choose_scale(samples: list[Sample], input_size: int, model_mpp: float = 0.0) -> Scale:
    """The model's scale for training on `samples` (see the module docstring)."""
    if not samples:
        raise IkdmilError("no training images; add images to the train split")
    has_mpp = _mpp_state(samples)
    if has_mpp and model_mpp > 0:
        return Scale(model_mpp, 0.0, "model_mpp as given")
    shorts = np.array([min(image_size(s)) for s in samples], np.float64)
    if has_mpp:
        um = float(np.median(shorts * np.array([s.mpp for s in samples])))
        return Scale(um / input_size, 0.0, f"median training image short side {um:.4g} µm = {input_size} px")
    return Scale(model_mpp, input_size / float(np.median(shorts)), f"median short side = {input_size} px")


def scale_for_model(meta: dict, samples: list[Sample], input_size: int) -> Scale:
    """The scale a model file was trained at (its `mpp` / `scale` metadata), for new data `samples`.

    A model without either (written before models stored their scale) gets `choose_scale` of the data.
    """
    mpp, factor = float(meta.get("mpp") or 0), float(meta.get("scale") or 0)
    has_mpp = _mpp_state(samples) if samples else False
    if mpp > 0 and has_mpp:
        return Scale(mpp, 0.0, "the model file's mpp")
    if factor > 0:
        return Scale(mpp, factor, "the model file's scale")
    return choose_scale(samples, input_size, mpp if has_mpp else 0.0)


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """(h, w) of an image of `shape` rescaled by `factor` in both axes."""
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def spread_starts(length: int, size: int, step: int) -> list[int]:
    """Origins of `size` windows covering [0, length), at most `step` apart, evenly spread, the last flush
    with the end; [0] when the length is at most one window (the window then runs past the end)."""
    if length <= size:
        return [0]
    n = math.ceil((length - size) / step) + 1
    return [round(i * (length - size) / (n - 1)) for i in range(n)]
