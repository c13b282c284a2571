"""Tiling a slide in model space: geometry, the blending window, the band stitcher and the tile dataset.

Conventions
- Model space is the slide resampled to the model's resolution (`model_mpp`); a tile is `tile` model
  px square, tiles step by `stride = tile - overlap` and the grid starts at the slide's top-left.
- The output grid is model space averaged down by `out_stride`; tile sizes and overlaps are multiples
  of it, so every tile lands on whole output pixels.
- Tile maps are blended by a window that ramps linearly over the overlap (`blend_window`) and
  normalised by the weight sum, so a constant map stays exactly constant and tiles leave no seams.
- `BandStitcher` holds only a band of output rows in memory: tiles arrive in row order and finished
  rows go straight to the (memory-mapped) uint8 probability and mask maps.
- Large tiles (`large_tilings`, for backbones registered as tile-invariant): tiles of one of the
  `LARGE_TILES` sizes (model px) whose overlap holds twice a `margin` = the model's reach (receptive
  field half-width) + the Gaussian's radius, plus a ramp. Which size: `cheapest_tiling`, the one
  that computes the fewest model pixels on this slide's tissue (large tiles waste little on overlap
  but much on glass when tissue is scattered; small ones the reverse). The window gives no weight to the
  `margin` px along each tile edge (where zero padding and the smoothing's reflection change the
  map), so every output pixel comes from tiles in which it lies deeper than the receptive field:
  the stitched map equals one forward pass over the whole slide, up to the window's `eps`
  weight and the slide's own border. Tile origins are multiples of the backbone's stride.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ikdmil.errors import IkdmilError
from ikdmil.io import one_line
from ikdmil.slide.reader import ImageSlide, Slide, open_slide, read_scaled
from ikdmil.slide.tissue import TissueMap

Box = tuple[float, float, float, float]  # level-0 (x, y, w, h)


@dataclass
class Geometry:
    """Tiling of one slide in model space and the output grid."""

    tile: int  # model px
    overlap: int
    stride: int  # tile - overlap
    out_stride: int
    d: tuple[float, float]  # level-0 px per model px (x, y)
    model_size: tuple[float, float]  # slide size in model px (w, h)
    out_size: tuple[int, int]  # output map (w, h)
    grid: tuple[int, int]  # tiles (cols, rows)
    margin: int = 0  # model px along each tile edge that get no blending weight (large tiles)

    @property
    def out_downsample(self) -> tuple[float, float]:
        """Level-0 px per output px."""
        return self.d[0] * self.out_stride, self.d[1] * self.out_stride

    def tile_box(self, col: int, row: int) -> Box:
        """Level-0 (x, y, w, h) of a tile."""
        return (col * self.stride * self.d[0], row * self.stride * self.d[1],
                self.tile * self.d[0], self.tile * self.d[1])

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        """Output-grid (y, x) of a tile's top-left pixel."""
        return row * self.stride // self.out_stride, col * self.stride // self.out_stride


def resolve_tiling(tile: int, overlap: int | None, out_stride: int) -> tuple[int, int]:
    """(tile, overlap) in model px, checked against each other and `out_stride`; overlap None: tile // 4."""
    if tile < 16:
        raise IkdmilError(f"--tile-size {tile}: must be at least 16 model pixels")
    if tile % out_stride:
        raise IkdmilError(f"--tile-size {tile} is not a multiple of --out-stride {out_stride}; "
                          "choose sizes that divide")
    if overlap is None:
        overlap = (tile // 4) // out_stride * out_stride
    if not 0 <= overlap < tile:
        raise IkdmilError(f"--overlap {overlap}: must be at least 0 and smaller than the tile size {tile}")
    if overlap % out_stride:
        raise IkdmilError(f"--overlap {overlap} is not a multiple of --out-stride {out_stride}; "
                          "choose sizes that divide")
    return tile, overlap


def slide_geometry(dimensions: tuple[int, int], mpp: tuple[float, float], model_mpp: float, tile: int,
                   overlap: int, out_stride: int, margin: int = 0) -> Geometry:
    """The tile grid and output grid of a slide of level-0 `dimensions` (w, h) at `mpp` (µm/px)."""
    W0, H0 = dimensions
    d = (model_mpp / mpp[0], model_mpp / mpp[1])
    wm, hm = W0 / d[0], H0 / d[1]
    stride = tile - overlap

    def count(n: float) -> int:
        return 1 if n <= tile else math.ceil((n - tile) / stride) + 1

    out_size = (max(1, math.ceil(wm / out_stride)), max(1, math.ceil(hm / out_stride)))
    return Geometry(tile, overlap, stride, out_stride, d, (wm, hm), out_size, (count(wm), count(hm)), margin)


#: tile sizes (model px) tried for tile-invariant backbones (`cheapest_tiling` picks one per slide; with
#: every tile processed, e.g. --all-tissue, that is the one whose overlap costs least)
LARGE_TILES = (384, 512, 768, 1024, 1536, 2048)


def large_tilings(reach: int, net_stride: int, smooth_radius: int, out_stride: int,
                  model_size: tuple[float, float]) -> list[tuple[int, int, int]]:
    """Every usable (tile, overlap, margin) in model px of `LARGE_TILES` for this model and slide, smallest
    first; empty when the overlap is wider than every large tile (use small tiles).

    `reach`: how far the model's output depends on its input (`receptive_reach`); `smooth_radius`:
    the Gaussian's half-width; a tile shrinks to the slide when the slide is smaller.
    """
    align = math.lcm(net_stride, out_stride)
    margin = _round_up(reach + smooth_radius, out_stride)
    overlap = _round_up(2 * margin + 4 * out_stride, align)  # a ramp of >= 4 output px between the margins
    extent = _round_up(math.ceil(max(model_size)), align)  # one tile covers a small slide
    tiles = {max(min(_round_up(t, align), extent), overlap + align) for t in LARGE_TILES
             if _round_up(t, align) > overlap}
    return [(t, overlap, margin) for t in sorted(tiles)]


def cheapest_tiling(options: list[tuple[int, int, int]], geometry, tissue: TissueMap | None, min_tissue: float):
    """The option (tile, overlap, margin) whose selected tiles hold the fewest model pixels, with its
    geometry and tiles: `geometry(tile, overlap, margin)` builds the grid. Ties go to the larger tile
    (fewer tiles: less per-tile work)."""
    best = None
    for option in options:
        geom = geometry(*option)
        boxes, cells = select_tiles(geom, tissue, min_tissue)
        cost = len(boxes) * option[0] ** 2
        if best is None or cost <= best[0]:
            best = (cost, option, geom, boxes, cells)
    return best[1:]


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def select_tiles(geom: Geometry, tissue: TissueMap | None,
                 min_tissue: float) -> tuple[list[Box], list[tuple[int, int]]]:
    """(level-0 boxes, (row, col) cells) of the tiles to process, in row order; tissue None: every tile."""
    boxes, cells = [], []
    for r in range(geom.grid[1]):
        for c in range(geom.grid[0]):
            box = geom.tile_box(c, r)
            if tissue is None or tissue.fraction(*box) > min_tissue:
                boxes.append(box)
                cells.append((r, c))
    return boxes, cells


def blend_window(n: int, ramp: int, eps: float = 1e-3, margin: int = 0) -> np.ndarray:
    """(n, n) weights: 1 inside, falling linearly to ~0 over `ramp` px at each edge (sums to 1 across overlaps).

    With a `margin`, the fall is over the middle `ramp - 2 * margin` px and the outer `margin` px get
    only `eps` (weights still sum to 1 across an overlap of `ramp`).
    """
    w = blend_profile(n, ramp, eps, margin)
    return np.outer(w, w).astype(np.float32)


def blend_profile(n: int, ramp: int, eps: float = 1e-3, margin: int = 0, first: bool = False,
                  last: bool = False) -> np.ndarray:
    """(n,) float32 weights along one axis of `blend_window`; `first` / `last`: that end lies on the
    slide's edge, where no other tile overlaps, so it keeps weight 1."""
    if ramp <= 0:
        return np.ones(n, np.float32)
    i = np.arange(n, dtype=np.float32) + 0.5
    span = ramp - 2 * margin
    rise = np.ones(n, np.float32) if first else (i - margin) / span
    fall = np.ones(n, np.float32) if last else (n - margin - i) / span
    return np.clip(np.minimum(rise, fall), eps, 1.0).astype(np.float32)


def tile_window(geom: Geometry, row: int, col: int, cache: dict) -> np.ndarray:
    """The blending window of a tile on the output grid. Small tiles share one `blend_window`; large
    tiles (a margin) keep weight 1 along the slide's edges, where their margin has no neighbour."""
    s = geom.out_stride
    n, ramp, margin = geom.tile // s, geom.overlap // s, geom.margin // s
    cols, rows = geom.grid
    key = (row == 0, row == rows - 1, col == 0, col == cols - 1) if margin else ()
    if key not in cache:
        if margin:
            wy = blend_profile(n, ramp, margin=margin, first=key[0], last=key[1])
            wx = blend_profile(n, ramp, margin=margin, first=key[2], last=key[3])
            cache[key] = np.outer(wy, wx).astype(np.float32)
        else:
            cache[key] = blend_window(n, ramp)
    return cache[key]


class BandStitcher:
    """Weighted blending of tile maps into a uint8 memmap, holding only a band of rows in memory.

    Tiles must arrive in non-decreasing row order. Each finished row is normalised by the weight sum,
    written as uint8 probability, thresholded (inside tissue) into the mask, and counted.
    """

    def __init__(self, prob: np.ndarray, mask: np.ndarray, band: int, threshold: float,
                 tissue_rows=None):
        self.prob, self.mask = prob, mask
        self.H, self.W = prob.shape
        self.band = band
        self.acc = np.zeros((band, self.W), np.float32)
        self.wsum = np.zeros((band, self.W), np.float32)
        self.y0 = 0
        self.threshold = threshold
        self.tissue_rows = tissue_rows  # callable(y0, y1) -> bool (y1-y0, W) tissue, or None = all tissue
        self.tumour_px = 0
        self.tissue_px = 0
        self.prob_sum_tissue = 0.0

    def add(self, y: int, x: int, p: np.ndarray, w: np.ndarray) -> None:
        if y < self.y0:
            raise ValueError("tiles must arrive in row order")
        if y > self.y0:
            self._flush(y)
        h, ww = min(p.shape[0], self.H - y), min(p.shape[1], self.W - x)
        if h <= 0 or ww <= 0:
            return
        r = y - self.y0
        self.acc[r:r + h, x:x + ww] += p[:h, :ww] * w[:h, :ww]
        self.wsum[r:r + h, x:x + ww] += w[:h, :ww]

    def _flush(self, y_new: int) -> None:
        y_new = min(y_new, self.H)
        n = min(y_new - self.y0, self.band)
        if n > 0:
            acc, ws = self.acc[:n], self.wsum[:n]
            p = np.divide(acc, ws, out=np.zeros_like(acc), where=ws > 0)
            self._write(self.y0, p)
            self.acc[:-n] = self.acc[n:].copy() if n < self.band else 0
            self.wsum[:-n] = self.wsum[n:].copy() if n < self.band else 0
            self.acc[self.band - n:] = 0
            self.wsum[self.band - n:] = 0
        for y in range(self.y0 + n, y_new, self.band):  # rows no tile touched: probability 0
            self._count_tissue_only(y, min(y + self.band, y_new))
        self.y0 = y_new

    def _write(self, y: int, p: np.ndarray) -> None:
        tissue = self.tissue_rows(y, y + p.shape[0]) if self.tissue_rows else np.ones(p.shape, bool)
        self.prob[y:y + p.shape[0]] = np.rint(p * 255).astype(np.uint8)
        m = (p >= self.threshold) & tissue
        self.mask[y:y + p.shape[0]] = m.astype(np.uint8) * 255
        self.tumour_px += int(m.sum())
        self.tissue_px += int(tissue.sum())
        self.prob_sum_tissue += float(p[tissue].sum())

    def _count_tissue_only(self, y0: int, y1: int) -> None:
        if self.tissue_rows:
            self.tissue_px += int(self.tissue_rows(y0, y1).sum())
        else:
            self.tissue_px += (y1 - y0) * self.W

    def close(self) -> None:
        self._flush(self.H)


def tissue_lookup(tissue: TissueMap, geom: Geometry):
    """A function (y0, y1) -> bool tissue rows on the output grid (nearest overview cell)."""
    ods = geom.out_downsample
    W, _ = geom.out_size
    th, tw = tissue.mask.shape
    cols = np.clip(((np.arange(W) + 0.5) * ods[0] / tissue.downsample[0]).astype(np.int64), 0, tw - 1)

    def rows(y0: int, y1: int) -> np.ndarray:
        r = np.clip(((np.arange(y0, y1) + 0.5) * ods[1] / tissue.downsample[1]).astype(np.int64), 0, th - 1)
        return tissue.mask[r][:, cols]

    return rows


# ------------------------------------------------------------------------------------ tile reading


class TileDataset(torch.utils.data.Dataset):
    """Model tiles of one slide; worker processes open their own slide handle.

    An item is (uint8 3xTxT tensor, index, error message or ""): read errors travel back as text so
    the main process can report them on one line.
    """

    def __init__(self, path: Path, mpp: float | None, boxes: list[Box], tile: int, slide: Slide | None = None):
        self.path, self.mpp, self.boxes, self.tile = str(path), mpp, boxes, tile
        self._slide = slide  # used in-process (workers=0, or an in-memory image inherited by fork)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.boxes)

    def _get_slide(self) -> Slide:
        if self._slide is None or (self._pid != os.getpid() and not isinstance(self._slide, ImageSlide)):
            self._slide = open_slide(self.path, self.mpp)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, i: int):
        try:
            region = read_scaled(self._get_slide(), self.boxes[i], (self.tile, self.tile))
            return torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1), i, ""
        except Exception as exc:  # noqa: BLE001 - reported per slide by the main process
            msg = str(exc) if isinstance(exc, IkdmilError) else f"{self.path}: cannot read a tile ({one_line(exc)})"
            return torch.zeros(3, self.tile, self.tile, dtype=torch.uint8), i, " ".join(msg.split())

    def __getstate__(self):
        state = dict(self.__dict__)
        if not isinstance(state.get("_slide"), ImageSlide):
            state["_slide"] = None  # never share an OpenSlide handle across processes
        return state


def auto_workers(device: torch.device) -> int:
    """Tile-reading processes for `--workers -1` on this machine and device."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    # on CPU the model needs every core and reading is ~3 % of the time: a reader process only pays off
    # when there are cores to spare (measured on 2 cores: 5.9 tiles/s in-process vs 5.4 with one worker)
    return 1 if cpus > 2 else 0


def tile_loader(slide: Slide, slide_path: Path, mpp: float | None, boxes: list[Box], tile: int, batch_size: int,
                workers: int, device: torch.device) -> tuple[torch.utils.data.DataLoader, int]:
    """(DataLoader of (tiles, indices, errors), workers used); `workers` -1: `auto_workers`."""
    workers = workers if workers >= 0 else auto_workers(device)
    in_memory = isinstance(slide, ImageSlide)
    if in_memory:
        workers = 0  # cropping an in-memory image is a memcpy; processes would only copy it
    dataset = TileDataset(slide_path, mpp, boxes, tile, slide if (in_memory or workers == 0) else None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
    )
    return loader, workers
