"""Tissue detection on a slide overview, or a tissue mask supplied by the user.

Automatic detection (`detect_tissue`), on an overview at about `TissueParams.mpp` µm/px:

1. saturation ``S = (max(R,G,B) - min(R,G,B)) / max(R,G,B)``; glass is grey/white (S near 0), stained
   tissue is coloured;
2. threshold: Otsu's threshold of S clamped to ``[min_threshold, max_threshold]`` (the clamp keeps a
   blank slide blank and an all-tissue image whole), or a fixed `threshold`;
3. clean-up: closing with an octagon (~disk) of radius `close_um`, then objects smaller than `min_object_um2` removed
   and holes smaller than `max_hole_um2` filled (both sizes capped at 5 % of the overview, so that a
   small image keeps its tissue).

A user mask (`load_user_mask`) is an image of any size (non-zero = tissue; scaled to the slide) or a
GeoJSON file of polygons in level-0 pixels (QuPath export), rasterised onto the same overview grid.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from ikdmil.errors import IkdmilError
from ikdmil.typed_settings import Opt, check_settings


@dataclass
class TissueParams:
    mpp: float = 8.0  # overview resolution in µm/px (finer for small slides, see overview_downsample)
    threshold: float | None = None  # fixed saturation threshold; None = Otsu clamped to the bounds below
    min_threshold: float = 0.05
    max_threshold: float = 0.15
    close_um: float = 24.0  # closing radius
    min_object_um2: float = 10_000.0  # tissue pieces smaller than this are dropped (0.01 mm²)
    max_hole_um2: float = 10_000.0  # holes smaller than this are filled

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> TissueParams:
        return check_settings(self, "tissue-")

    # command-line help and bounds (`ikdmil.config.Opt`); predict and prepare show them as --tissue-NAME
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "mpp": Opt("overview resolution, µm/px", above=0),
        "threshold": Opt("fixed saturation threshold (default: Otsu clamped to [min-threshold, max-threshold])",
                         min=0, max=1),
        "min_threshold": Opt("lower clamp of Otsu's threshold", min=0, max=1),
        "max_threshold": Opt("upper clamp of Otsu's threshold", min=0, max=1),
        "close_um": Opt("closing radius, µm", min=0),
        "min_object_um2": Opt("drop tissue pieces smaller than this, µm²", min=0),
        "max_hole_um2": Opt("fill holes smaller than this, µm²", min=0),
    }


@dataclass
class TissueMap:
    """A boolean tissue mask on a grid where one cell is `downsample` level-0 pixels (x and y)."""

    mask: np.ndarray  # (h, w) bool
    downsample: tuple[float, float]
    source: str  # "otsu", "threshold", "image:<path>", "geojson:<path>", "all"
    threshold: float | None = None

    def __post_init__(self):
        h, w = self.mask.shape
        m = self.mask.astype(np.int32)  # 4 bytes per overview px (int32 holds any overview up to 2**31 px)
        np.cumsum(m, axis=0, out=m)
        np.cumsum(m, axis=1, out=m)
        self._integral = np.zeros((h + 1, w + 1), np.int32)
        self._integral[1:, 1:] = m

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Share of tissue cells in the level-0 box (x, y, w, h); cells overlapping the box count whole."""
        dx, dy = self.downsample
        H, W = self.mask.shape
        c0, r0 = max(0, math.floor(x / dx)), max(0, math.floor(y / dy))
        c1, r1 = min(W, math.ceil((x + w) / dx)), min(H, math.ceil((y + h) / dy))
        # cells beyond the slide count as background
        total = (max(1, math.ceil((x + w) / dx) - math.floor(x / dx))
                 * max(1, math.ceil((y + h) / dy) - math.floor(y / dy)))
        if c1 <= c0 or r1 <= r0:
            return 0.0
        s = self._integral
        inside = s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]
        return float(inside) / total

    def area_px(self) -> float:
        """Tissue area in level-0 pixels."""
        return float(self.mask.sum()) * self.downsample[0] * self.downsample[1]


def overview_downsample(dimensions: tuple[int, int], mpp: tuple[float, float], target_mpp: float,
                        min_size: int = 512) -> float:
    """Level-0 px per overview px: `target_mpp`, but fine enough that the overview has >= `min_size` px across."""
    longest = max(dimensions)
    ds = target_mpp / min(mpp)
    ds = min(ds, longest / min_size)
    return max(1.0, ds)


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    if values.size == 0 or float(values.max()) == float(values.min()):
        return float(values.max()) if values.size else 0.0
    return float(threshold_otsu(values))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max as float32, without a float copy of the RGB image."""
    mx = rgb.max(axis=-1)
    sat = (mx - rgb.min(axis=-1)).astype(np.float32)
    sat /= np.maximum(mx, 1).astype(np.float32)
    return sat


def detect_tissue(rgb: np.ndarray, mpp: float, params: TissueParams | None = None) -> tuple[np.ndarray, float]:
    """(bool tissue mask, threshold used) for an overview image at `mpp` µm/px."""
    params = params or TissueParams()
    sat = saturation(rgb)
    if params.threshold is not None:
        thr = float(params.threshold)
    else:
        thr = float(np.clip(_otsu(sat), params.min_threshold, params.max_threshold))
    mask = sat > thr
    mask = binary_close(mask, params.close_um / mpp)
    px_area = mpp * mpp
    cap = 0.05 * mask.size  # on a tiny image, "small" is also relative: at most 5 % of it
    mask = remove_small_components(mask, min(params.min_object_um2 / px_area, cap))
    mask = fill_small_holes(mask, min(params.max_hole_um2 / px_area, cap))
    return mask, thr


def binary_close(mask: np.ndarray, radius: float) -> np.ndarray:
    """Morphological closing with a disk-like element of `radius` px; outside the image is background.

    Small radii (the usual case: 24 µm on an 8 µm/px overview = 3 px) use alternating 3x3 square and
    cross steps (an octagon; O(N * radius) time, O(N) bytes). Large radii only happen on the small
    overviews of small slides and use exact Euclidean distance transforms (O(N) time, ~24 bytes/px).
    """
    from scipy import ndimage

    r = int(round(radius))
    if r < 1 or not mask.any():
        return mask
    pad = r + 1
    m = np.pad(mask, pad)
    if r > 8:
        dilated = ndimage.distance_transform_edt(~m) <= radius
        m = ndimage.distance_transform_edt(dilated) > radius
    else:
        square = np.ones((3, 3), bool)
        cross = ndimage.generate_binary_structure(2, 1)
        for i in range(r):
            m = ndimage.binary_dilation(m, structure=cross if i % 2 else square)
        for i in range(r):
            m = ndimage.binary_erosion(m, structure=cross if i % 2 else square, border_value=1)
    return m[pad:-pad, pad:-pad]


def remove_small_components(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected True components with fewer than `min_px` pixels."""
    from scipy import ndimage

    if min_px <= 1 or not mask.any():
        return mask
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= min_px
    keep[0] = False
    return keep[lab]


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill holes (False components not touching the border, 4-connected) with fewer than `max_px` pixels."""
    from scipy import ndimage

    if max_px < 1 or mask.all():
        return mask
    lab, n = ndimage.label(~mask)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill = sizes < max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[lab]


def slide_tissue(slide, params: TissueParams | None = None, user_mask: str | os.PathLike | None = None,
                 everything: bool = False) -> tuple[TissueMap, np.ndarray]:
    """(TissueMap, overview RGB) for a slide: detected, from a user mask, or everything."""
    from ikdmil.slide.reader import read_overview

    params = params or TissueParams()
    mpp = slide.mpp or (1.0, 1.0)
    ds = overview_downsample(slide.dimensions, mpp, params.mpp)
    overview = read_overview(slide, ds)
    shape = overview.shape[:2]
    if everything:
        return TissueMap(np.ones(shape, bool), (ds, ds), "all"), overview
    if user_mask is not None:
        mask = load_user_mask(user_mask, slide.dimensions, shape, ds)
        return TissueMap(mask, (ds, ds), f"{'geojson' if _is_geojson(user_mask) else 'image'}:{user_mask}"), overview
    mask, thr = detect_tissue(overview, ds * min(mpp), params)
    source = "threshold" if params.threshold is not None else "otsu"
    return TissueMap(mask, (ds, ds), source, thr), overview


def _is_geojson(path) -> bool:
    return Path(path).suffix.lower() in (".geojson", ".json")


def load_user_mask(path: str | os.PathLike, dimensions: tuple[int, int], shape: tuple[int, int],
                   downsample: float) -> np.ndarray:
    """A user tissue mask on the overview grid (`shape`), from an image or a level-0 GeoJSON file."""
    path = Path(path)
    if not path.is_file():
        raise IkdmilError(f"{path}: tissue mask not found; pass an image (non-zero = tissue) or a GeoJSON file")
    if _is_geojson(path):
        from ikdmil.slide.geojson import read_polygons

        polys = read_polygons(path)
        return draw_polygons(np.zeros(shape, bool), polys, 1.0 / downsample, fill=True)
    try:
        with Image.open(path) as im:
            im.load()
            m = im.convert("L")
    except (OSError, ValueError) as exc:
        raise IkdmilError(f"{path}: cannot read the tissue mask image ({' '.join(str(exc).split())}); "
                          "save it as PNG with non-zero = tissue") from None
    w, h = m.size
    sw, sh = dimensions
    if abs(w / h - sw / sh) > 0.02 * (sw / sh):
        raise IkdmilError(
            f"{path}: tissue mask is {w}x{h} px but the slide is {sw}x{sh} px (another aspect ratio); "
            "give a mask of the slide's shape at any scale"
        )
    return np.asarray(m.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 0


def draw_polygons(canvas: np.ndarray, polygons, scale: float, offset: tuple[float, float] = (0.0, 0.0),
                  fill: int = 1) -> np.ndarray:
    """Rasterise shapely (Multi)Polygons into a 2-D array in place: exteriors filled, holes cleared.

    Coordinates are mapped as ``(x - offset_x) * scale`` (pixel-edge convention: pixel (i, j) is the
    square [j, j+1] x [i, i+1]); a pixel is filled when its centre is inside. Polygons are drawn
    largest first, so islands inside holes survive.
    """
    from skimage.draw import polygon as fill_polygon

    parts = []
    for g in polygons:
        parts.extend(getattr(g, "geoms", [g]))
    parts = [p for p in parts if p.geom_type == "Polygon" and not p.is_empty]
    parts.sort(key=lambda p: -p.area)
    ox, oy = offset

    def draw(ring, value):
        xy = np.asarray(ring.coords)
        if len(xy) < 3:
            return
        cols = (xy[:, 0] - ox) * scale - 0.5  # pixel-centre coordinates
        rows = (xy[:, 1] - oy) * scale - 0.5
        rr, cc = fill_polygon(rows, cols, shape=canvas.shape)
        canvas[rr, cc] = value

    for p in parts:
        draw(p.exterior, fill)
        for hole in p.interiors:
            draw(hole, 0)
    return canvas
