"""Segmenting whole slides and patch images with a trained model (`ikdmil predict`).

Slides (and plain images larger than `PredictSettings.patch_max`) are processed in model space, the
slide resampled to the model's training resolution (`model_mpp`, µm/px):

1. tissue is found on an overview (~8 µm/px; see `ikdmil.slide.tissue`) or taken from a user mask;
2. tiles of `tile_size` model pixels on a grid with `overlap` are kept when they hold tissue, read in
   DataLoader worker processes from the nearest finer pyramid level and downsampled to the model
   resolution, and run through the model in batches (bf16 autocast on CUDA);
3. each tile's fused map is optionally smoothed (`sigma`, as in evaluation), averaged down by
   `out_stride`, weighted by a window that ramps linearly over the overlap, and accumulated into a
   rolling band of rows; rows that no later tile can reach are normalised (sum / weight sum: no seams)
   and written to a uint8 memory-mapped map on disk. Nothing is ever held at level 0, and the only
   full-size arrays are the uint8 probability and mask maps at output resolution (memory-mapped);
4. outputs per slide (folder OUT/NAME/, written to a temporary folder and renamed when complete):
   ``probability.tif`` (tiled pyramidal TIFF, uint8 = probability x 255, with mpp tags),
   ``mask.tif`` (same geometry, 0/255: probability >= threshold inside tissue), ``tumour.geojson``
   (QuPath annotations, level-0 pixel coordinates), ``overlay.png`` and ``heatmap.png`` (thumbnails),
   ``tissue.png`` and ``summary.json``.

Patch images (plain images up to `patch_max` px) are treated like training images: resized to the
model's input size, predicted, the map resized back, thresholded; OUT/masks/NAME.png and
OUT/overlays/NAME.png are written, and OUT/patches.json lists each image's tumour fraction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ikdmil import __version__
from ikdmil.io import one_line, replace_folder, chmod_default, read_rgb, write_png, write_text
from ikdmil.slide.tissue import TissueMap, slide_tissue
from ikdmil.slide.reader import PLAIN_SUFFIXES, ImageSlide, Slide, expand_inputs, open_slide, read_scaled
from ikdmil.slide.tiff import write_pyramid_tiff
from ikdmil.errors import IkdmilError
from ikdmil.inference.settings import DEFAULT_MODEL_MPP, PredictSettings

CONFIG_NAME = "predict_config.yaml"
SUMMARY_NAME = "summary.json"


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

    @property
    def out_downsample(self) -> tuple[float, float]:
        """Level-0 px per output px."""
        return self.d[0] * self.out_stride, self.d[1] * self.out_stride

    def tile_box(self, col: int, row: int) -> tuple[float, float, float, float]:
        """Level-0 (x, y, w, h) of a tile."""
        return (col * self.stride * self.d[0], row * self.stride * self.d[1],
                self.tile * self.d[0], self.tile * self.d[1])


def resolve_tiling(tile: int, overlap: int | None, out_stride: int) -> tuple[int, int]:
    if tile < 16:
        raise IkdmilError(f"--tile-size {tile}: must be at least 16 model pixels")
    if tile % out_stride:
        raise IkdmilError(f"--tile-size {tile} is not a multiple of --out-stride {out_stride}; choose sizes that divide")
    if overlap is None:
        overlap = (tile // 4) // out_stride * out_stride
    if not 0 <= overlap < tile:
        raise IkdmilError(f"--overlap {overlap}: must be at least 0 and smaller than the tile size {tile}")
    if overlap % out_stride:
        raise IkdmilError(f"--overlap {overlap} is not a multiple of --out-stride {out_stride}; choose sizes that divide")
    return tile, overlap


def slide_geometry(dimensions: tuple[int, int], mpp: tuple[float, float], model_mpp: float, tile: int,
                   overlap: int, out_stride: int) -> Geometry:
    W0, H0 = dimensions
    d = (model_mpp / mpp[0], model_mpp / mpp[1])
    wm, hm = W0 / d[0], H0 / d[1]
    stride = tile - overlap

    def count(n: float) -> int:
        return 1 if n <= tile else math.ceil((n - tile) / stride) + 1

    out_size = (max(1, math.ceil(wm / out_stride)), max(1, math.ceil(hm / out_stride)))
    return Geometry(tile, overlap, stride, out_stride, d, (wm, hm), out_size, (count(wm), count(hm)))


def blend_window(n: int, ramp: int, eps: float = 1e-3) -> np.ndarray:
    """(n, n) weights: 1 inside, falling linearly to ~0 over `ramp` px at each edge (sums to 1 across overlaps)."""
    if ramp <= 0:
        return np.ones((n, n), np.float32)
    i = np.arange(n, dtype=np.float32) + 0.5
    w = np.clip(np.minimum(i / ramp, (n - i) / ramp), eps, 1.0)
    return np.outer(w, w).astype(np.float32)


class BandStitcher:
    """Weighted blending of tile maps into a uint8 memmap, holding only a band of rows in memory.

    Tiles must arrive in non-decreasing row order. Each finished row is normalised by the weight sum,
    written as uint8 probability, thresholded (inside tissue) into the mask, and counted.
    """

    def __init__(self, prob: np.ndarray, mask: np.ndarray, band: int, threshold: float,
                 tissue_rows: np.ndarray | None = None):
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

    def __init__(self, path: Path, mpp: float | None, boxes: list[tuple[float, float, float, float]], tile: int,
                 slide: Slide | None = None):
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
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(8, cpus - 1))
    # on CPU the model needs every core and reading is ~3 % of the time: a reader process only pays off
    # when there are cores to spare (measured on 2 cores: 5.9 tiles/s in-process vs 5.4 with one worker)
    return 1 if cpus > 2 else 0


# -------------------------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    model: torch.nn.Module
    meta: dict
    path: Path
    device: torch.device
    input_size: int
    mpp: float
    mpp_source: str
    amp: bool
    batch_size: int

    @torch.no_grad()
    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """(B,H,W) float32 fused probability on the device for a uint8 (B,3,H,W) batch."""
        from ikdmil.device import autocast

        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            out = self.model(x).fused
        return out[:, 0].float()


def load_for_inference(path: str | os.PathLike, settings: PredictSettings) -> LoadedModel:
    from ikdmil.device import resolve_device
    from ikdmil.models.checkpoint import load_model

    device = resolve_device(settings.device)
    model, meta = load_model(path, device)
    model = model.to(memory_format=torch.channels_last).eval()
    if settings.model_mpp is not None:
        mpp, source = float(settings.model_mpp), "--model-mpp"
    elif isinstance(meta.get("mpp"), (int, float)) and meta["mpp"] > 0:
        mpp, source = float(meta["mpp"]), "model file"
    else:
        mpp, source = DEFAULT_MODEL_MPP, "default (model file has no mpp)"
    batch = settings.batch_size or (32 if device.type == "cuda" else 4)
    return LoadedModel(model, meta, Path(path), device, int(meta.get("input_size", 256)), mpp, source,
                       settings.amp, batch)


def gaussian_smooth(x: torch.Tensor, sigma: float, truncate: float = 4.0, conv: bool | None = None) -> torch.Tensor:
    """Gaussian blur of (B,H,W) maps on their device, equal to scipy.ndimage.gaussian_filter(mode="reflect").

    The same smoothing as `ikdmil.metrics.smooth_probability` (used by evaluation), but on the GPU
    when there is one, so that smoothing never becomes the bottleneck of slide inference (on the CPU,
    scipy is 3-60x faster than a 1-channel torch convolution, so it is used there; `conv` forces a path).
    """
    if sigma <= 0:
        return x
    if not (conv if conv is not None else x.device.type != "cpu"):
        from ikdmil.metrics import smooth_probability

        return torch.from_numpy(smooth_probability(x.float().numpy(), sigma))
    r = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    k = (k / k.sum()).to(x.device, torch.float32)
    y = x[:, None].float()
    for dim in (-1, -2):  # separable: along x then y, with half-sample symmetric padding (scipy "reflect")
        n = y.shape[dim]
        if r >= n:  # maps smaller than the kernel: let scipy handle the repeated reflections
            from ikdmil.metrics import smooth_probability

            return torch.from_numpy(smooth_probability(x.float().cpu().numpy(), sigma)).to(x.device)
        left = y.narrow(dim, 0, r).flip(dim)
        right = y.narrow(dim, n - r, r).flip(dim)
        y = torch.cat([left, y, right], dim)
        w = k.view(1, 1, 1, -1) if dim == -1 else k.view(1, 1, -1, 1)
        y = F.conv2d(y, w)
    return y[:, 0]


def _tile_maps(lm: LoadedModel, batch: torch.Tensor, sigma: float, s: int) -> np.ndarray:
    """(B, T/s, T/s) float32: fused maps, smoothed per tile as in evaluation, averaged down by s (on the device)."""
    fused = gaussian_smooth(lm.fused(batch), sigma)
    if s > 1:
        fused = F.avg_pool2d(fused[:, None], s)[:, 0]
    return fused.cpu().numpy()


# -------------------------------------------------------------------------------------------- slides


def _reduce_to(arr: np.ndarray, size: tuple[int, int], how: str = "mean", band: int = 512) -> np.ndarray:
    """A (possibly memmapped) uint8 map reduced by an integer factor band by band, then resized to `size` (w, h)."""
    H, W = arr.shape
    f = max(1, min(H // max(size[1], 1), W // max(size[0], 1)))
    rows = []
    step = band * f
    for y in range(0, H, step):
        block = np.asarray(arr[y:y + step])
        h = block.shape[0] // f * f
        w = W // f * f
        if h == 0:
            continue
        b = block[:h, :w].reshape(h // f, f, w // f, f)
        rows.append(b.max(axis=(1, 3)) if how == "max" else b.mean(axis=(1, 3)).astype(np.uint8))
    small = np.concatenate(rows, 0) if rows else np.zeros((1, 1), np.uint8)
    resample = Image.Resampling.NEAREST if how == "max" else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(small).resize(size, resample))


def _thumbnail(overview: np.ndarray, max_size: int) -> np.ndarray:
    h, w = overview.shape[:2]
    f = min(1.0, max_size / max(h, w))
    if f >= 1.0:
        return overview
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(overview).resize(size, Image.Resampling.BILINEAR))


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _settings_key(lm: LoadedModel, settings: PredictSettings, slide_path: Path) -> str:
    relevant = settings.to_dict()
    for k in ("device", "workers", "batch_size", "overwrite", "amp"):
        relevant.pop(k, None)
    h = hashlib.sha256()
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    h.update(_file_key(lm.path).encode())
    h.update(_file_key(slide_path).encode())
    h.update(str(lm.mpp).encode())
    return h.hexdigest()[:16]


def _user_mask_for(settings: PredictSettings, slide_path: Path) -> str | None:
    if not settings.tissue_mask:
        return None
    p = Path(settings.tissue_mask)
    if p.is_dir():
        for ext in (".geojson", ".json", ".png", ".tif", ".tiff", ".jpg", ".bmp"):
            cand = p / (slide_path.stem + ext)
            if cand.is_file():
                return str(cand)
        raise IkdmilError(
            f"{p}: no tissue mask for {slide_path.name} (expected {slide_path.stem}.geojson or {slide_path.stem}.png); "
            "add it or drop --tissue-mask"
        )
    return str(p)


def predict_slide(lm: LoadedModel, slide_path: Path, out_dir: Path, settings: PredictSettings,
                  progress: bool = True, slide: Slide | None = None) -> dict:
    """Segment one slide into out_dir (written atomically); returns its summary."""
    t_start = time.perf_counter()
    key = _settings_key(lm, settings, slide_path)
    done = out_dir / SUMMARY_NAME
    if done.is_file() and not settings.overwrite:
        try:
            old = json.loads(done.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("settings_key") == key:
            old["status"] = "skipped"
            return old
    slide = slide or open_slide(slide_path, settings.mpp)
    try:
        mpp = slide.require_mpp()
        tile, overlap = resolve_tiling(settings.tile_size or lm.input_size, settings.overlap, settings.out_stride)
        geom = slide_geometry(slide.dimensions, mpp, lm.mpp, tile, overlap, settings.out_stride)
        user_mask = _user_mask_for(settings, slide_path)
        tissue, overview = slide_tissue(slide, settings.tissue, user_mask, settings.all_tissue)
        boxes, cells = [], []
        for r in range(geom.grid[1]):
            for c in range(geom.grid[0]):
                box = geom.tile_box(c, r)
                if settings.all_tissue or tissue.fraction(*box) > settings.min_tissue:
                    boxes.append(box)
                    cells.append((r, c))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        chmod_default(tmp, 0o777)  # mkdtemp makes it private; the final folder should look like any other
        try:
            summary = _run_slide(lm, slide, slide_path, tmp, settings, geom, tissue, overview, boxes, cells,
                                 progress, t_start)
            summary["settings_key"] = key
            write_text(tmp / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
            replace_folder(tmp, out_dir, hidden=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        slide.close()
    summary["status"] = "done"
    return summary


def _run_slide(lm: LoadedModel, slide: Slide, slide_path: Path, tmp: Path, settings: PredictSettings,
               geom: Geometry, tissue: TissueMap, overview: np.ndarray, boxes, cells, progress: bool,
               t_start: float) -> dict:
    s = geom.out_stride
    tile_out = geom.tile // s
    W, H = geom.out_size
    prob = np.memmap(tmp / ".probability.u8", np.uint8, "w+", shape=(H, W))
    mask = np.memmap(tmp / ".mask.u8", np.uint8, "w+", shape=(H, W))
    stitcher = BandStitcher(prob, mask, tile_out, settings.threshold,
                            None if settings.all_tissue else tissue_lookup(tissue, geom))
    window = blend_window(tile_out, geom.overlap // s)
    workers = settings.workers if settings.workers >= 0 else auto_workers(lm.device)
    in_memory = isinstance(slide, ImageSlide)
    if in_memory:
        workers = 0  # cropping an in-memory image is a memcpy; processes would only copy it
    dataset = TileDataset(slide_path, settings.mpp, boxes, geom.tile, slide if (in_memory or workers == 0) else None)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=lm.batch_size, shuffle=False, num_workers=workers,
        pin_memory=lm.device.type == "cuda", prefetch_factor=4 if workers else None,
    )
    t_infer = time.perf_counter()
    bar = tqdm(total=len(boxes), desc=slide_path.name, unit="tile", disable=not progress, leave=False)
    try:
        for batch, idx, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                raise IkdmilError(bad[0])
            maps = _tile_maps(lm, batch, settings.sigma, s)
            for k, i in enumerate(idx.tolist()):
                r, c = cells[i]
                stitcher.add(r * geom.stride // s, c * geom.stride // s, maps[k], window)
            bar.update(len(idx))
    finally:
        bar.close()
    stitcher.close()
    prob.flush()
    mask.flush()
    infer_s = time.perf_counter() - t_infer

    out_mpp = (lm.mpp * s, lm.mpp * s)  # µm per output px (model resolution x out_stride)
    write_pyramid_tiff(tmp / "probability.tif", prob, out_mpp, reduce="mean", scratch=tmp)
    write_pyramid_tiff(tmp / "mask.tif", mask, out_mpp, reduce="max", scratch=tmp)

    from ikdmil.slide.geojson import feature_collection, mask_polygons, to_level0, write_geojson

    min_area_px = settings.min_area_um2 / (out_mpp[0] * out_mpp[1])
    polys = mask_polygons(mask, min_area=min_area_px, simplify=0.5)
    polys = to_level0(polys, geom.out_downsample)
    fc = feature_collection(polys, slide.mpp, settings.class_name, settings.colour, key=slide_path.name)
    write_geojson(tmp / "tumour.geojson", fc)

    from ikdmil.visualize import heatmap, overlay

    thumb = _thumbnail(overview, settings.thumbnail_size)
    size = (thumb.shape[1], thumb.shape[0])
    prob_t = _reduce_to(prob, size, "mean").astype(np.float32) / 255.0
    mask_t = _reduce_to(mask, size, "max") > 0
    tissue_t = np.asarray(Image.fromarray(tissue.mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    write_png(tmp / "overlay.png", overlay(thumb, mask_t))
    heat = heatmap(prob_t).astype(np.float32)
    blend = np.where((tissue_t | (prob_t > 0))[..., None], 0.45 * thumb + 0.55 * heat, thumb.astype(np.float32))
    write_png(tmp / "heatmap.png", blend.clip(0, 255).astype(np.uint8))
    write_png(tmp / "tissue.png", tissue.mask)
    total_s = time.perf_counter() - t_start
    del prob, mask
    for f in (".probability.u8", ".mask.u8"):
        (tmp / f).unlink()

    out_px_area_mm2 = out_mpp[0] * out_mpp[1] / 1e6
    tissue_model_mpx = len(boxes) and tissue.area_px() / (geom.d[0] * geom.d[1]) / 1e6
    areas = [p.area * slide.mpp[0] * slide.mpp[1] for p in polys]
    return {
        "slide": slide_path.name,
        "path": str(slide_path.resolve()),
        "reader": slide.kind,
        "dimensions": list(slide.dimensions),
        "levels": len(slide.level_dimensions),
        "mpp": list(slide.mpp),
        "mpp_source": slide.mpp_source,
        "model": str(lm.path),
        "model_mpp": lm.mpp,
        "model_mpp_source": lm.mpp_source,
        "read_level": slide.best_level(min(geom.d)),
        "level0_px_per_model_px": list(geom.d),
        "tile_size": geom.tile,
        "overlap": geom.overlap,
        "out_stride": s,
        "output_mpp": list(out_mpp),
        "output_size": [W, H],
        "threshold": settings.threshold,
        "sigma": settings.sigma,
        "tissue": {"source": tissue.source, "threshold": tissue.threshold,
                   "area_mm2": round(tissue.area_px() * slide.mpp[0] * slide.mpp[1] / 1e6, 4),
                   "overview_downsample": tissue.downsample[0]},
        "tiles": len(boxes),
        "tiles_total": geom.grid[0] * geom.grid[1],
        "tumour_area_mm2": round(stitcher.tumour_px * out_px_area_mm2, 4),
        "tumour_fraction_of_tissue": round(stitcher.tumour_px / stitcher.tissue_px, 6) if stitcher.tissue_px else 0.0,
        "mean_probability_in_tissue": round(stitcher.prob_sum_tissue / stitcher.tissue_px, 6) if stitcher.tissue_px else 0.0,
        "polygons": len(polys),
        "polygon_area_mm2": round(sum(areas) / 1e6, 4),
        "min_area_um2": settings.min_area_um2,
        "seconds": round(total_s, 3),
        "inference_seconds": round(infer_s, 3),
        "tiles_per_second": round(len(boxes) / infer_s, 3) if infer_s > 0 else None,
        "tissue_megapixels_per_second": round(tissue_model_mpx / total_s, 4) if total_s > 0 else None,
        "workers": workers,
        "batch_size": lm.batch_size,
        "device": str(lm.device),
        "files": ["probability.tif", "mask.tif", "tumour.geojson", "overlay.png", "heatmap.png", "tissue.png",
                  SUMMARY_NAME],
    }


# ------------------------------------------------------------------------------------------- patches


def predict_patches(lm: LoadedModel, paths: list[Path], out: Path, settings: PredictSettings,
                    progress: bool = True) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Masks and overlays for patch images, in batches; returns (per-image results, failures)."""
    from ikdmil.data.dataset import resize_rgb
    from ikdmil.visualize import heatmap, overlay, side_by_side

    size = settings.tile_size or lm.input_size
    results, failures = [], []
    bar = tqdm(total=len(paths), desc="patches", unit="img", disable=not progress, leave=False)
    for start in range(0, len(paths), lm.batch_size):
        chunk = paths[start:start + lm.batch_size]
        images, ok = [], []
        for p in chunk:
            try:
                images.append(read_rgb(p))
                ok.append(p)
            except IkdmilError as exc:
                failures.append((p, str(exc)))
        if ok:
            batch = torch.from_numpy(np.stack([resize_rgb(im, size) for im in images])).permute(0, 3, 1, 2)
            probs = gaussian_smooth(lm.fused(batch), settings.sigma).cpu().numpy()
            for p, img, pr in zip(ok, images, probs):
                h, w = img.shape[:2]
                full = np.asarray(Image.fromarray(pr.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
                pred = full >= settings.threshold
                write_png(out / "masks" / f"{p.stem}.png", pred)
                write_png(out / "overlays" / f"{p.stem}.png", side_by_side(overlay(img, pred), heatmap(full)))
                results.append({"image": str(p), "width": w, "height": h,
                                "tumour_fraction": round(float(pred.mean()), 6),
                                "max_probability": round(float(full.max()), 6)})
        bar.update(len(chunk))
    bar.close()
    return results, failures


# --------------------------------------------------------------------------------------------- batch


@dataclass
class PredictReport:
    slides: list[dict]
    patches: list[dict]
    failures: list[tuple[str, str]]  # (input, one-line message)
    config_path: Path


def _classify(path: Path, settings: PredictSettings) -> str:
    """'slide' or 'patch' for an input (errors surface later, when it is opened)."""
    if settings.mode != "auto":
        if settings.mode == "patch" and path.suffix.lower() not in PLAIN_SUFFIXES:
            return "slide"
        return settings.mode
    from ikdmil.slide.reader import is_plain_image

    if not path.is_file() or path.suffix.lower() not in PLAIN_SUFFIXES or not is_plain_image(path):
        return "slide"
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError, SyntaxError):
        return "patch"  # unreadable: read_rgb reports it with the usual message
    return "slide" if max(w, h) > settings.patch_max else "patch"


def _check_names(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen and seen[p.stem] != p:
            raise IkdmilError(
                f"{p}: has the same name as {seen[p.stem]}; outputs are named after the file, so rename one of them "
                "or predict them into different --out folders"
            )
        seen[p.stem] = p


def write_config(out: Path, model: Path, inputs: list[Path], settings: PredictSettings, lm: LoadedModel) -> Path:
    import yaml

    cfg = {
        "command": "predict",
        "ikdmil_version": __version__,
        "model": str(model),
        "model_backbone": lm.meta.get("backbone"),
        "model_input_size": lm.input_size,
        "model_mpp": lm.mpp,
        "model_mpp_source": lm.mpp_source,
        "device": str(lm.device),
        "inputs": [str(p) for p in inputs],
        "settings": settings.to_dict(),
    }
    path = out / CONFIG_NAME
    write_text(path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def predict(model: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
            settings: PredictSettings | None = None, progress: bool = True, echo=print) -> PredictReport:
    """Segment every input (slides, large images, patch images, folders of them) into `out`.

    A failing input is recorded and the batch goes on; the caller decides the exit status from
    `report.failures`.
    """
    settings = (settings or PredictSettings()).validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IkdmilError(f"{out}: exists and is a file; choose an output folder")
    paths = expand_inputs(list(inputs))
    if not paths:
        raise IkdmilError("no inputs given; pass slides, images or folders of them")
    _check_names(paths)
    lm = load_for_inference(model, settings)
    resolve_tiling(settings.tile_size or lm.input_size, settings.overlap, settings.out_stride)  # option errors first
    out.mkdir(parents=True, exist_ok=True)
    config_path = write_config(out, Path(model), paths, settings, lm)

    slides, failures, patch_paths = [], [], []
    kinds = {p: _classify(p, settings) for p in paths}
    slide_paths = [p for p in paths if kinds[p] == "slide"]
    patch_paths = [p for p in paths if kinds[p] == "patch"]
    for n, p in enumerate(slide_paths, 1):
        try:
            s = predict_slide(lm, p, out / p.stem, settings, progress)
            slides.append(s)
            if s.get("status") == "skipped":
                echo(f"[{n}/{len(slide_paths)}] {p.name}: already done with these settings, skipped "
                     f"({out / p.stem}; --overwrite to redo)")
            else:
                echo(f"[{n}/{len(slide_paths)}] {p.name}: {s['tiles']} tiles, tumour {s['tumour_area_mm2']:.3f} mm² "
                     f"({100 * s['tumour_fraction_of_tissue']:.1f} % of tissue), {s['polygons']} polygons, "
                     f"{s['seconds']:.1f} s -> {out / p.stem}")
        except KeyboardInterrupt:
            raise
        except IkdmilError as exc:
            failures.append((str(p), " ".join(str(exc).split())))
        except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the batch
            failures.append((str(p), f"{p}: failed ({type(exc).__name__}: {one_line(exc)})"))
    patches: list[dict] = []
    if patch_paths:
        patches, bad = predict_patches(lm, patch_paths, out, settings, progress)
        failures.extend((str(p), " ".join(m.split())) for p, m in bad)
        write_text(out / "patches.json", json.dumps({"threshold": settings.threshold, "images": patches}, indent=2) + "\n")
        echo(f"{len(patches)} patch images: masks in {out / 'masks'}, overlays in {out / 'overlays'}")
    batch = {
        "slides": [{k: s.get(k) for k in ("slide", "status", "tiles", "tumour_area_mm2", "tumour_fraction_of_tissue",
                                           "polygons", "seconds")} for s in slides],
        "patches": len(patches),
        "failures": [{"input": i, "error": m} for i, m in failures],
    }
    write_text(out / "predict_summary.json", json.dumps(batch, indent=2) + "\n")
    return PredictReport(slides, patches, failures, config_path)
