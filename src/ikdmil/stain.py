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

`scale_stains` changes the staining of an image (tests, `benchmarks/stain.py`).

Torch colour deconvolution (`rgb_to_hed`, `hed_to_rgb`): skimage's own matrices and log scaling, on
any device, without the clamp of negative concentrations (so that a round trip is exact up to uint8
rounding). Two uses share it:

- **Augmentation** (`jitter_stains`, training `--stain-augment SIGMA`): per image, each HED channel
  ``c -> c * (1 + N(0, sigma)) + N(0, sigma * SHIFT_UNIT)``. `SHIFT_UNIT` is a typical tissue
  concentration (mean H and E of H&E tissue lie around 0.005-0.1 in these units).
- **Reinhard normalisation** (`reinhard`, predict `--stain-normalise reinhard`): per HED channel the
  slide's tissue mean and std are mapped onto the training data's, ``c -> (c - m_s) / s_s * s_r + m_r``.
  The statistics of both sides are measured at the same coarse resolution (`ReinhardReference.mpp`,
  the tissue overview's ~8 µm/px), because a slide's statistics come from its overview once per
  slide, so every tile of a slide gets the same mapping whatever the tile size; std shrinks with
  resolution (fine texture averages out), so comparing a thumbnail's std with full-resolution
  training pixels would over-stretch every slide. Pure concentration scaling (another lab's
  staining) is undone exactly and glass (zero concentration) stays glass.
- **Macenko normalisation** (`macenko`, predict `--stain-normalise macenko`; Macenko et al., ISBI 2009):
  the stain vectors are the image's own, not Ruifrok-Johnston's. On the optical density
  ``OD = -ln((RGB + 1) / 256)`` of tissue pixels with every channel's OD above `MACENKO_BETA`, the
  plane of the two largest principal axes holds both stains; the vectors at the `MACENKO_ALPHA` and
  100 - alpha percentiles of the pixels' angle in that plane are the two stains (haematoxylin the one
  with the larger red OD). Concentrations are the least-squares solution on those vectors, and each
  stain's 99th percentile is its `max_conc`. Normalising replaces the slide's vectors by the
  reference's and scales each concentration by ``max_conc_ref / max_conc_slide``, so a different
  stain hue is corrected too, which Reinhard's fixed matrix cannot do. Statistics come from the same
  coarse overview as Reinhard's, for the same reason (percentiles shrink with resolution).

`measure_reference`, `normalise`, `overview_reference` and `reference_from_meta` take either method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
SHIFT_UNIT = 0.02  # augmentation shift std = sigma x this (HED units of skimage.color.rgb2hed)
LOG_ADJUST = float(np.log(1e-6))  # skimage's scaling of the optical density
REFERENCE_MPP = 8.0  # µm/px at which Reinhard statistics are measured (the tissue overview's, TissueParams.mpp)
MIN_REFERENCE_SIDE = 16  # training images are not reduced below this many px for the Reinhard reference
STD_FLOOR = 1e-4  # a channel with less spread than this is only shifted, never divided by ~0
MACENKO_BETA = 0.15  # OD below this in any channel is too faint (glass, pale cytoplasm) to place the stains
MACENKO_ALPHA = 1.0  # percentile of the angle that gives each stain vector (robust extremes)
MACENKO_MAX_PERCENTILE = 99.0  # a stain's "maximum" concentration
MACENKO_MIN_PIXELS = 16


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


_MATRICES: dict = {}


def _matrices(device, dtype) -> tuple:
    """skimage's (hed_from_rgb, rgb_from_hed) on `device`, copied there once (no host copy per step)."""
    key = (str(device), dtype)
    if key not in _MATRICES:
        from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

        _MATRICES[key] = (torch_tensor(hed_from_rgb, device, dtype), torch_tensor(rgb_from_hed, device, dtype))
    return _MATRICES[key]


def torch_tensor(a, device, dtype):
    import torch

    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def rgb_to_hed(x):
    """(B,3,H,W) uint8 RGB -> float32 HED concentrations, as skimage.color.rgb2hed but unclamped."""
    import torch

    hed_from_rgb, _ = _matrices(x.device, torch.float32)
    rgb = (x.float() / 255.0).clamp(min=1e-6)
    return torch.einsum("bchw,cd->bdhw", torch.log(rgb) / LOG_ADJUST, hed_from_rgb)


def hed_to_rgb(hed):
    """(B,3,H,W) float HED -> uint8 RGB, as skimage.color.hed2rgb (then x 255, rounded)."""
    import torch

    _, rgb_from_hed = _matrices(hed.device, torch.float32)
    rgb = torch.exp(torch.einsum("bchw,cd->bdhw", hed.float() * LOG_ADJUST, rgb_from_hed)).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8)


def jitter_stains(x, sigma: float, generator):
    """uint8 (B,3,H,W) batch with each image's H, E and residual scaled and shifted at random (module
    docstring); the draws come from `generator` (on the host, so that resume reproduces them). sigma 0:
    x itself, nothing drawn."""
    import torch

    if sigma <= 0:
        return x
    z = torch.randn((x.shape[0], 2, 3), generator=generator).to(x.device, non_blocking=True)
    scale, shift = 1 + sigma * z[:, 0, :, None, None], sigma * SHIFT_UNIT * z[:, 1, :, None, None]
    out = hed_to_rgb(rgb_to_hed(x) * scale + shift)
    return out.contiguous(memory_format=torch.channels_last) if not x.is_contiguous() else out


@dataclass(frozen=True)
class ReinhardReference:
    """Per-channel HED mean and std of tissue pixels measured at `mpp` µm/px: the training images reduced
    `downsample` times from the model's scale (stored in the model file), or a slide's overview."""

    method: ClassVar[str] = "reinhard"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float
    downsample: float

    def to_meta(self) -> dict:
        return {"mean": _rounded(self.mean), "std": _rounded(self.std), "mpp": round(self.mpp, 6),
                "downsample": round(self.downsample, 6)}

    @classmethod
    def from_meta(cls, entry: dict) -> ReinhardReference:
        mean, std = (tuple(float(v) for v in entry[k]) for k in ("mean", "std"))
        mpp, factor = float(entry["mpp"]), float(entry["downsample"])
        if len(mean) != 3 or len(std) != 3 or not np.all(np.isfinite(mean + std)) or min(std) < 0 or \
                not (mpp > 0 and factor >= 1):
            raise ValueError("values")
        return cls(mean, std, mpp, factor)


def reduce_rgb(rgb: np.ndarray, factor: float) -> np.ndarray:
    """uint8 RGB shrunk `factor` times by box averaging (as a slide pyramid's overview); itself at <= 1."""
    if factor <= 1.0:
        return rgb
    from PIL import Image

    h, w = rgb.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def tissue_pixels(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(N,3) uint8 tissue pixels of an RGB image: HSV saturation above `TISSUE_SATURATION`, within `mask`
    when given (every statistic and normaliser here measures these)."""
    from ikdmil.slide.tissue import saturation

    keep = saturation(rgb) > TISSUE_SATURATION
    if mask is not None:
        keep &= mask
    return rgb[keep]


def _hed_pixels(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(N,3) unclamped HED (the normaliser's space) of the tissue pixels of a uint8 RGB image."""
    import torch

    tissue = tissue_pixels(rgb, mask)
    if len(tissue) == 0:
        return np.zeros((0, 3), np.float64)
    pixels = torch.from_numpy(np.ascontiguousarray(tissue))[None].permute(2, 0, 1)[None]  # (1,3,1,N)
    return rgb_to_hed(pixels)[0, :, 0].T.double().numpy()


def _reference_images(images: np.ndarray, model_mpp: float, max_images: int) -> tuple[list[np.ndarray], float]:
    """(training images reduced to `REFERENCE_MPP`, never below `MIN_REFERENCE_SIDE` px; the factor)."""
    n = len(images)
    if n == 0:
        return [], 1.0
    factor = max(1.0, min(REFERENCE_MPP / model_mpp, min(images.shape[1:3]) / MIN_REFERENCE_SIDE))
    picks = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
    return [reduce_rgb(np.asarray(images[i]), factor) for i in picks], factor


def reinhard_reference(images: np.ndarray, model_mpp: float, max_images: int = MAX_IMAGES
                       ) -> ReinhardReference | None:
    """The Reinhard reference of (N,S,S,3) uint8 training images at model scale `model_mpp` µm/px, measured
    on them reduced to `REFERENCE_MPP` (`_reference_images`); None without tissue."""
    reduced, factor = _reference_images(images, model_mpp, max_images)
    hed = np.concatenate([_hed_pixels(r) for r in reduced]) if reduced else np.zeros((0, 3))
    if len(hed) < 2:
        return None
    return ReinhardReference(_floats(hed.mean(0)), _floats(hed.std(0)), model_mpp * factor, factor)


def measure_reinhard(rgb: np.ndarray, mask: np.ndarray | None = None) -> ReinhardReference | None:
    """A slide's (or patch's) statistics from an RGB image already at the reference's µm/px."""
    hed = _hed_pixels(rgb, mask)
    if len(hed) < 2:
        return None
    return ReinhardReference(_floats(hed.mean(0)), _floats(hed.std(0)), 0.0, 1.0)


def overview_reference(overview: np.ndarray, mask: np.ndarray | None, overview_mpp: float,
                       target_mpp: float, method: str = "reinhard"):
    """A slide's statistics for `method` from its tissue overview (at `overview_mpp` µm/px), reduced to the
    reference's `target_mpp` first when the overview is finer; None without tissue."""
    factor = target_mpp / overview_mpp
    if factor > 1.0:
        small = reduce_rgb(overview, factor)
        if mask is not None:
            from PIL import Image

            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (small.shape[1], small.shape[0]), Image.Resampling.BOX)) >= 128
        overview = small
    return measure_reference(method, overview, mask)


def reinhard(x, source: ReinhardReference, target: ReinhardReference):
    """uint8 (B,3,H,W) with every pixel's HED mapped from `source`'s statistics onto `target`'s."""
    import torch

    dev = x.device
    m_s, m_t = torch_tensor(source.mean, dev, torch.float32), torch_tensor(target.mean, dev, torch.float32)
    s_s = torch_tensor(source.std, dev, torch.float32)
    gain = torch.where(s_s > STD_FLOOR, torch_tensor(target.std, dev, torch.float32) / s_s.clamp(min=STD_FLOOR),
                       torch.ones_like(s_s))
    view = (1, 3, 1, 1)
    return hed_to_rgb((rgb_to_hed(x) - m_s.view(view)) * gain.view(view) + m_t.view(view))


def reference_from_meta(meta: dict, path: str | Path, method: str = "reinhard"):
    """The model file's reference for `method` (reinhard | macenko); a one-line error when it has none
    (older files) or it is damaged."""
    entry = (meta.get("stain") or {}).get(method) if isinstance(meta.get("stain"), dict) else None
    if entry is None:
        raise IkdmilError(f"{path}: the model file has no stain reference for {method} (written by an older "
                          "ikdmil); retrain it, or pass --stain-normalise none")
    try:
        return _METHODS[method][0].from_meta(entry)
    except (KeyError, TypeError, ValueError) as exc:
        raise IkdmilError(f"{path}: damaged stain reference in the model file's metadata ({exc}); copy the file "
                          "again, retrain, or pass --stain-normalise none") from None


# ------------------------------------------------------------------------------------------------ Macenko


@dataclass(frozen=True)
class MacenkoReference:
    """Unit OD vectors of haematoxylin and eosin (`stains`, 2 x RGB) and each stain's 99th-percentile
    concentration (`max_conc`), measured at `mpp` µm/px (the training images reduced `downsample` times,
    or a slide's overview)."""

    method: ClassVar[str] = "macenko"
    stains: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_conc: tuple[float, float]
    mpp: float
    downsample: float

    def to_meta(self) -> dict:
        return {"stains": [_rounded(v) for v in self.stains], "max_conc": _rounded(self.max_conc),
                "mpp": round(self.mpp, 6), "downsample": round(self.downsample, 6)}

    @classmethod
    def from_meta(cls, entry: dict) -> MacenkoReference:
        stains = tuple(tuple(float(c) for c in v) for v in entry["stains"])
        max_conc = tuple(float(v) for v in entry["max_conc"])
        mpp, factor = float(entry["mpp"]), float(entry["downsample"])
        values = np.array([c for v in stains for c in v] + list(max_conc), np.float64)
        if len(stains) != 2 or any(len(v) != 3 for v in stains) or len(max_conc) != 2 or \
                not np.all(np.isfinite(values)) or min(max_conc) <= 0 or not (mpp > 0 and factor >= 1):
            raise ValueError("values")
        return cls(stains, max_conc, mpp, factor)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """float64 OD = -ln((RGB + 1) / 256) of uint8 RGB values (any shape ending in 3)."""
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def _macenko_pixels(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(N,3) OD of the tissue pixels dark enough in every channel to place the stains."""
    od = optical_density(tissue_pixels(rgb, mask))
    return od[(od > MACENKO_BETA).all(axis=1)]


def macenko_fit(od: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(stains (2,3) unit OD vectors, H first; max_conc (2,)) from (N,3) tissue OD; None with too few pixels
    or stains that cannot be told apart."""
    if len(od) < MACENKO_MIN_PIXELS:
        return None
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, [2, 1]]  # the two largest principal axes
    plane *= np.where(plane.sum(0) < 0, -1.0, 1.0)  # pointing into positive OD
    xy = od @ plane
    angle = np.arctan2(xy[:, 1], xy[:, 0])
    lo, hi = np.percentile(angle, [MACENKO_ALPHA, 100 - MACENKO_ALPHA])
    a = plane @ np.array([np.cos(lo), np.sin(lo)])
    b = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([a, b] if a[0] > b[0] else [b, a])  # haematoxylin absorbs red more than eosin
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    if abs(float(stains[0] @ stains[1])) > 0.999:
        return None
    conc = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
    max_conc = np.percentile(conc, MACENKO_MAX_PERCENTILE, axis=1)
    if not np.all(max_conc > 1e-6):
        return None
    return stains, max_conc


def measure_macenko(rgb: np.ndarray, mask: np.ndarray | None = None) -> MacenkoReference | None:
    """A slide's (or patch's) Macenko stains from an RGB image already at the reference's µm/px."""
    return _macenko_reference(macenko_fit(_macenko_pixels(rgb, mask)), 0.0, 1.0)


def _macenko_reference(fit, mpp: float, downsample: float) -> MacenkoReference | None:
    """The reference of a `macenko_fit` result (None stays None)."""
    if fit is None:
        return None
    return MacenkoReference(tuple(_floats(v) for v in fit[0]), tuple(float(v) for v in fit[1]), mpp, downsample)


def macenko_reference(images: np.ndarray, model_mpp: float, max_images: int = MAX_IMAGES
                      ) -> MacenkoReference | None:
    """The Macenko reference of (N,S,S,3) uint8 training images at `model_mpp` µm/px: one fit on the tissue
    pixels of all of them, reduced as for Reinhard (`_reference_images`); None without enough tissue."""
    reduced, factor = _reference_images(images, model_mpp, max_images)
    fit = macenko_fit(np.concatenate([_macenko_pixels(r) for r in reduced])) if reduced else None
    return _macenko_reference(fit, model_mpp * factor, factor)


def macenko(x, source: MacenkoReference, target: MacenkoReference):
    """uint8 (B,3,H,W) re-stained: concentrations on `source`'s vectors, scaled by the max_conc ratio,
    recombined with `target`'s vectors."""
    import torch

    dev = x.device
    s_inv = torch.linalg.pinv(torch_tensor(source.stains, dev, torch.float32).T)  # (2,3)
    t = torch_tensor(target.stains, dev, torch.float32)  # (2,3)
    gain = torch_tensor(target.max_conc, dev, torch.float32) / torch_tensor(source.max_conc, dev, torch.float32)
    od = -torch.log((x.float() + 1.0) / 256.0)
    conc = torch.einsum("sc,bchw->bshw", s_inv, od) * gain.view(1, 2, 1, 1)
    rgb = 256.0 * torch.exp(-torch.einsum("sc,bshw->bchw", t, conc)) - 1.0
    return rgb.clamp(0, 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------- either method


#: per normaliser: (reference class, measure an image, map a batch, the training images' reference)
_METHODS = {
    "reinhard": (ReinhardReference, measure_reinhard, reinhard, reinhard_reference),
    "macenko": (MacenkoReference, measure_macenko, macenko, macenko_reference),
}
NORMALISE = ("none", *_METHODS)  # predict --stain-normalise choices


def measure_reference(method: str, rgb: np.ndarray, mask: np.ndarray | None = None):
    """A slide's or patch's statistics for `method` (reinhard | macenko) at the reference's µm/px, or None."""
    return _METHODS[method][1](rgb, mask)


def normalise(x, source, target):
    """uint8 (B,3,H,W) mapped from `source`'s stain onto `target`'s (two references of one method)."""
    return _METHODS[target.method][2](x, source, target)


def normalise_rgb(rgb: np.ndarray, source, target) -> np.ndarray:
    """`normalise` for one uint8 (H,W,3) image, as an (H,W,3) array."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    return normalise(x, source, target)[0].permute(1, 2, 0).numpy()


def training_references(images: np.ndarray, model_mpp: float) -> dict:
    """{method: reference meta} of every normaliser for the model file (methods without tissue left out)."""
    refs = {name: m[3](images, model_mpp) for name, m in _METHODS.items()}
    return {k: v.to_meta() for k, v in refs.items() if v is not None}


def tissue_hed(rgb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) float HED values of the tissue pixels of a uint8 RGB image (within `mask` when given)."""
    from skimage.color import rgb2hed

    pixels = tissue_pixels(rgb, mask)
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
