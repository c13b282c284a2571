"""One slide's outputs: tiles through the model, stitched into maps, written as TIFF, GeoJSON and PNGs.

Slides (and plain images larger than `PredictSettings.patch_max`) are processed in model space, the
slide resampled to the model's training resolution (`model_mpp`, µm/px):

1. tissue is found on an overview (~8 µm/px; see `ikdmil.slide.tissue`) or taken from a user mask;
2. tiles of `tile_size` model pixels on a grid with `overlap` are kept when they hold tissue (for
   backbones registered as tile-invariant, when neither is set: large tiles whose overlap covers the
   receptive field, see `ikdmil.inference.tiling`), read in
   DataLoader worker processes from the nearest finer pyramid level and downsampled to the model
   resolution, and run through the model in batches (bf16 autocast on CUDA);
3. each tile's fused map is optionally smoothed (`sigma`, as in evaluation), averaged down by
   `out_stride`, weighted by a window that ramps linearly over the overlap, and accumulated into a
   rolling band of rows; rows that no later tile can reach are normalised (sum / weight sum: no seams)
   and written to a uint8 memory-mapped map on disk. Nothing is ever held at level 0, and the only
   full-size arrays are the uint8 probability and mask maps at output resolution (memory-mapped);
4. outputs per slide (folder OUT/NAME/, written to a temporary folder ``.NAME.tmp-HOST-PID-*`` and
   renamed when complete; an existing OUT/NAME/ is replaced only when ikdmil predict wrote it, see
   `ikdmil.inference.outputs`):
   ``probability.tif`` (tiled pyramidal TIFF, uint8 = probability x 255, with mpp tags),
   ``mask.tif`` (same geometry, 0/255: probability >= threshold inside tissue), ``tumour.geojson``
   (QuPath annotations, level-0 pixel coordinates), ``overlay.png`` (tissue outline blue, tumour outline
   green, tumour tinted, with a legend) and ``heatmap.png``: thumbnails whose long side is
   `thumbnail_size` (or level 0's when smaller), the maps resampled onto them;
   ``tissue.png`` and ``summary.json`` (with its ``warnings``, see `ikdmil.inference.sanity`).

A slide whose ``summary.json`` records the same settings key (settings that change the output, the
model file and the slide file) is skipped unless `overwrite`.

Plausibility (each a one-line error that fails this slide, never an empty "0 tiles" result): no
tissue (a user mask that is empty or lies outside the slide, a blank slide, a `min_tissue` no tile
reaches), and a resolution that would enlarge the slide more than `MAX_UPSAMPLE` times to reach the
model's (a magnification typed as µm/px, a wrong ``--model-mpp``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ikdmil.errors import IkdmilError
from ikdmil.inference.model import LoadedModel, gaussian_radius, tile_maps
from ikdmil.inference.outputs import RUNTIME_SETTINGS, check_owned, locked, write_marker
from ikdmil.inference.sanity import slide_warnings
from ikdmil.inference.settings import PredictSettings
from ikdmil.inference.tiling import (
    BandStitcher,
    Box,
    Geometry,
    cheapest_tiling,
    large_tilings,
    resolve_tiling,
    slide_geometry,
    tile_loader,
    tile_window,
    tissue_lookup,
)
from ikdmil.io import chmod_default, make_temp_dir, one_line, replace_folder, write_png, write_text
from ikdmil.slide.reader import Slide, open_slide
from ikdmil.slide.tiff import write_pyramid_tiff
from ikdmil.slide.tissue import TissueMap, slide_tissue
from ikdmil.stain import MacenkoReference, ReinhardReference, normalise, normalise_rgb, overview_reference
from ikdmil.visualize import SLIDE_OVERLAY_LEGEND

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
OUTPUT_FILES = ["probability.tif", "mask.tif", "tumour.geojson", "overlay.png", "heatmap.png", "tissue.png",
                SUMMARY_NAME]
#: the most a slide is enlarged to reach the model's resolution (model px per level-0 px); more is a mistake
MAX_UPSAMPLE = 4.0
_MPP_SOURCE = {"--model-mpp": "--model-mpp", "model file": "the model file's"}


@dataclass
class SlideJob:
    """One slide to segment: the model, the opened slide, its tiling and tissue, the tiles to run."""

    lm: LoadedModel
    slide: Slide
    path: Path
    settings: PredictSettings
    geom: Geometry
    tissue: TissueMap
    overview: np.ndarray  # RGB overview at the tissue map's resolution (thumbnails are made from it)
    boxes: list[Box]  # level-0 boxes of the tiles to run, in row order
    cells: list[tuple[int, int]]  # their (row, col) in the tile grid
    batch_size: int  # tiles per forward pass
    stain_source: ReinhardReference | MacenkoReference | None = None  # --stain-normalise: this slide's


def predict_slide(lm: LoadedModel, slide_path: Path, out_dir: Path, settings: PredictSettings,
                  progress: bool = True, slide: Slide | None = None) -> dict:
    """Segment one slide into out_dir (written atomically); returns its summary ("status": done/skipped).

    An existing `out_dir` is skipped when done with the same settings, replaced when ikdmil predict
    wrote it and it holds nothing else, and refused (IkdmilError) otherwise.
    """
    t_start = time.perf_counter()
    if slide is None and not slide_path.exists():
        raise IkdmilError(f"{slide_path}: not found; check the path (give slide or image files, or folders of them)")
    check_owned(out_dir, "slide", subject=slide_path)
    key = _settings_key(lm, settings, slide_path)
    old = finished_summary(out_dir, key) if not settings.overwrite else None
    if old is not None:
        old["status"] = "skipped"
        return old
    check_owned(out_dir, "slide", exact=True, subject=slide_path)  # it will be replaced: refuse before any work
    slide = slide or open_slide(slide_path, settings.mpp)
    try:
        job = plan_slide(lm, slide, slide_path, settings)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out_dir)  # .NAME.tmp-HOST-PID-*: removed by the next run if this one is killed
        chmod_default(tmp, 0o777)  # mkdtemp makes it private; the final folder should look like any other
        try:
            summary = run_slide(job, tmp, progress, t_start)
            summary["settings_key"] = key
            write_text(tmp / SUMMARY_NAME, json.dumps(summary, indent=2, allow_nan=False) + "\n")
            write_marker(tmp, "slide", OUTPUT_FILES)
            with locked(out_dir.parent):  # another run may have written out_dir meanwhile
                check_owned(out_dir, "slide", exact=True, subject=slide_path)
                replace_folder(tmp, out_dir, hidden=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        slide.close()
    summary["status"] = "done"
    return summary


def plan_slide(lm: LoadedModel, slide: Slide, slide_path: Path, settings: PredictSettings) -> SlideJob:
    """Resolution, tiling, tissue and the tiles to run for one opened slide (one-line errors)."""
    mpp = slide.require_mpp()
    enlarge = max(mpp) / lm.mpp
    if enlarge > MAX_UPSAMPLE:
        where = "--mpp" if slide.mpp_source == "--mpp" else "the slide's metadata"
        raise IkdmilError(
            f"{slide_path}: at {max(mpp):g} µm/px ({where}) the slide would be enlarged {enlarge:.0f}x to the "
            f"model's {lm.mpp:g} µm/px ({_MPP_SOURCE.get(lm.mpp_source, 'the default: the model file has none')}), "
            f"more than {MAX_UPSAMPLE:g}x; check --mpp (micrometres per "
            "pixel, e.g. 0.25 at 40x, 0.5 at 20x, not a magnification) and --model-mpp"
        )
    model_size = (slide.dimensions[0] * mpp[0] / lm.mpp, slide.dimensions[1] * mpp[1] / lm.mpp)
    user_mask = _user_mask_for(settings, slide_path)
    tissue, overview = slide_tissue(slide, settings.tissue, user_mask, settings.all_tissue)
    def geometry(t: int, o: int, m: int) -> Geometry:
        return slide_geometry(slide.dimensions, mpp, lm.mpp, t, o, settings.out_stride, m)

    (tile, overlap, margin), geom, boxes, cells = cheapest_tiling(  # the size with the fewest model px on tissue
        tiling_options(lm, settings, model_size), geometry, None if settings.all_tissue else tissue,
        settings.min_tissue)
    if not boxes:
        raise IkdmilError(_no_tiles(slide_path, slide, settings, tissue, user_mask))
    batch = lm.batch_size
    if margin and settings.batch_size is None:  # large tiles: about as many pixels per batch as small ones
        batch = max(1, lm.batch_size * lm.input_size ** 2 // tile ** 2)
    logger.debug("%s: %d of %d tiles of %d px (overlap %d, margin %d), batch %d", slide_path.name, len(boxes),
                 geom.grid[0] * geom.grid[1], tile, overlap, margin, batch)
    return SlideJob(lm, slide, slide_path, settings, geom, tissue, overview, boxes, cells, batch,
                    _stain_source(lm, slide, slide_path, tissue, overview))


def _stain_source(lm: LoadedModel, slide: Slide, slide_path: Path, tissue: TissueMap,
                  overview: np.ndarray) -> ReinhardReference | MacenkoReference | None:
    """The slide's stain statistics for --stain-normalise, once per slide from its tissue overview (so every
    tile, whatever its size, is mapped alike); None without normalisation or without stained tissue."""
    target = lm.stain_reference
    if target is None:
        return None
    overview_mpp = tissue.downsample[0] * min(slide.require_mpp())
    source = overview_reference(overview, tissue.mask, overview_mpp, lm.mpp * target.downsample,
                                target.method)
    if source is None:
        logger.warning("%s: no stained tissue on the overview; its tiles are not stain-normalised", slide_path.name)
    return source


def tiling_options(lm: LoadedModel, settings: PredictSettings,
                   model_size: tuple[float, float]) -> list[tuple[int, int, int]]:
    """(tile, overlap, margin) model px to choose from (`cheapest_tiling` picks by this slide's tissue): with
    --large-tiles, every large size for a tile-invariant model when neither --tile-size nor --overlap is given
    (`LoadedModel.reach` is then known), else the one small tiling at the model's input size."""
    if settings.large_tiles and lm.reach is not None and settings.tile_size is None and settings.overlap is None:
        large = large_tilings(lm.reach, lm.net_stride, gaussian_radius(settings.sigma), settings.out_stride,
                              model_size)
        if large:
            return large
    tile, overlap = resolve_tiling(settings.tile_size or lm.input_size, settings.overlap, settings.out_stride)
    return [(tile, overlap, 0)]


def run_slide(job: SlideJob, tmp: Path, progress: bool, t_start: float) -> dict:
    """Write every output of `job` into the folder `tmp`; returns the summary (without the settings key)."""
    W, H = job.geom.out_size
    prob = np.memmap(tmp / ".probability.u8", np.uint8, "w+", shape=(H, W))
    mask = np.memmap(tmp / ".mask.u8", np.uint8, "w+", shape=(H, W))
    t_infer = time.perf_counter()
    stitcher, workers = stitch_tiles(job, prob, mask, progress)
    infer_s = time.perf_counter() - t_infer

    s = job.geom.out_stride
    out_mpp = (job.lm.mpp * s, job.lm.mpp * s)  # µm per output px (model resolution x out_stride)
    write_pyramid_tiff(tmp / "probability.tif", prob, out_mpp, reduce="mean", scratch=tmp)
    write_pyramid_tiff(tmp / "mask.tif", mask, out_mpp, reduce="max", scratch=tmp)
    polys = write_annotations(job, mask, out_mpp, tmp / "tumour.geojson")
    thumb, thumb_tissue = write_thumbnails(job, prob, mask, tmp)
    total_s = time.perf_counter() - t_start
    del prob, mask
    for f in (".probability.u8", ".mask.u8"):
        (tmp / f).unlink()
    summary = slide_summary(job, stitcher, polys, out_mpp, workers, infer_s, total_s)
    seen = thumb  # the stain check measures what the model saw: the normalised slide with --stain-normalise
    if job.stain_source is not None:
        seen = normalise_rgb(thumb, job.stain_source, job.lm.stain_reference)
    slide_warnings(summary, seen, thumb_tissue, job.lm.stain, raw=thumb if seen is not thumb else None)
    if job.lm.stain_reference is not None:
        summary["stain_normalise"] = ({"method": job.lm.stain_reference.method, "slide": job.stain_source.to_meta()}
                                      if job.stain_source is not None else {"method": "none", "reason": "no tissue"})
    return summary


def stitch_tiles(job: SlideJob, prob: np.ndarray, mask: np.ndarray, progress: bool) -> tuple[BandStitcher, int]:
    """Run every tile of `job` through the model and blend the maps into `prob` and `mask` (flushed).

    Returns the closed stitcher (tumour / tissue counts) and the number of reader processes used.
    """
    lm, geom, settings = job.lm, job.geom, job.settings
    s = geom.out_stride
    tile_out = geom.tile // s
    stitcher = BandStitcher(prob, mask, tile_out, settings.threshold,
                            None if settings.all_tissue else tissue_lookup(job.tissue, geom))
    windows: dict = {}
    loader, workers = tile_loader(job.slide, job.path, settings.mpp, job.boxes, geom.tile, job.batch_size,
                                  settings.workers, lm.device)
    bar = tqdm(total=len(job.boxes), desc=job.path.name, unit="tile", disable=not progress, leave=False)
    try:
        for batch, idx, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                raise IkdmilError(bad[0])
            if job.stain_source is not None:
                batch = normalise(batch.to(lm.device, non_blocking=True), job.stain_source, lm.stain_reference)
            maps = tile_maps(lm, batch, settings.sigma, s)
            for k, i in enumerate(idx.tolist()):
                row, col = job.cells[i]
                y, x = geom.tile_origin(row, col)
                stitcher.add(y, x, maps[k], tile_window(geom, row, col, windows))
            bar.update(len(idx))
    finally:
        bar.close()
    stitcher.close()
    prob.flush()
    mask.flush()
    return stitcher, workers


def write_annotations(job: SlideJob, mask: np.ndarray, out_mpp: tuple[float, float], path: Path) -> list:
    """Tumour polygons of the mask as QuPath GeoJSON at `path`; returns the polygons (level-0 px)."""
    from ikdmil.slide.geojson import feature_collection, mask_polygons, to_level0, write_geojson

    settings = job.settings
    min_area_px = settings.min_area_um2 / (out_mpp[0] * out_mpp[1])
    polys = mask_polygons(mask, min_area=min_area_px, simplify=0.5)
    polys = to_level0(polys, job.geom.out_downsample)
    fc = feature_collection(polys, job.slide.mpp, settings.class_name, settings.colour, key=job.path.name)
    write_geojson(path, fc)
    return polys


def write_thumbnails(job: SlideJob, prob: np.ndarray, mask: np.ndarray, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """overlay.png (tissue and tumour outlines), heatmap.png (probability over tissue) and tissue.png in `folder`.

    Returns the thumbnail and its tissue mask (the stain check measures them). The maps are resampled
    onto the thumbnail's grid: upsampled (bilinear; the tumour then is the upsampled probability >=
    threshold inside tissue, a smooth outline instead of blocks) when the map is coarser, reduced when finer.
    """
    from ikdmil.visualize import contour_lines, heatmap, slide_overlay

    thumb, ds = slide_thumbnail(job)
    size = (thumb.shape[1], thumb.shape[0])
    out_ds = job.geom.out_downsample
    ratio = (ds / out_ds[0], ds / out_ds[1])  # map px per thumbnail px
    prob_t = map_on_grid(prob, size, ratio, "mean")
    tissue_ratio = (ds / job.tissue.downsample[0], ds / job.tissue.downsample[1])
    tissue_t = map_on_grid(job.tissue.mask.astype(np.uint8) * 255, size, tissue_ratio, "mean") >= 128
    if min(ratio) >= 1:
        mask_t = map_on_grid(mask, size, ratio, "max") > 0
    else:
        mask_t = (prob_t >= job.settings.threshold * 255) & (tissue_t | job.settings.all_tissue)
    tissue_lines = [] if job.settings.all_tissue else contour_lines(job.tissue.mask, tissue_ratio)
    write_png(folder / "overlay.png", slide_overlay(thumb, mask_t, tissue_lines, contour_lines(mask_t)))
    prob_f = prob_t.astype(np.float32) / 255.0
    heat = heatmap(prob_f).astype(np.float32)
    blend = np.where((tissue_t | (prob_t > 0))[..., None], 0.45 * thumb + 0.55 * heat, thumb.astype(np.float32))
    write_png(folder / "heatmap.png", blend.clip(0, 255).astype(np.uint8))
    write_png(folder / "tissue.png", job.tissue.mask)
    return thumb, tissue_t


def slide_thumbnail(job: SlideJob) -> tuple[np.ndarray, float]:
    """(RGB thumbnail, level-0 px per thumbnail px): the slide with its long side at `thumbnail_size` (at most
    level 0's), whatever the map's stride. Taken from the tissue overview when that is fine enough, else read
    from the nearest finer pyramid level in chunks (`read_overview`; level 0 is never read whole)."""
    from ikdmil.slide.reader import read_overview

    W0, H0 = job.slide.dimensions
    ds = max(1.0, max(W0, H0) / job.settings.thumbnail_size)
    ov_ds = job.tissue.downsample[0]
    if ov_ds > ds * (1 + 1e-6):
        return read_overview(job.slide, ds), ds
    size = (max(1, math.ceil(W0 / ds)), max(1, math.ceil(H0 / ds)))  # as read_overview sizes it
    if size == (job.overview.shape[1], job.overview.shape[0]):
        return job.overview, ds
    return map_on_grid(job.overview, size, (ds / ov_ds, ds / ov_ds), "mean"), ds


def slide_summary(job: SlideJob, stitcher: BandStitcher, polys: list, out_mpp: tuple[float, float], workers: int,
                  infer_s: float, total_s: float) -> dict:
    """The summary.json of one slide: inputs, resolution, tiling, tissue, tumour measurements, timing."""
    lm, slide, geom, settings, tissue = job.lm, job.slide, job.geom, job.settings, job.tissue
    n = len(job.boxes)
    out_px_area_mm2 = out_mpp[0] * out_mpp[1] / 1e6
    tissue_model_mpx = n and tissue.area_px() / (geom.d[0] * geom.d[1]) / 1e6
    areas = [p.area * slide.mpp[0] * slide.mpp[1] for p in polys]
    tissue_px = stitcher.tissue_px
    return {
        "slide": job.path.name,
        "path": str(job.path.resolve()),
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
        "blend_margin": geom.margin,
        "out_stride": geom.out_stride,
        "output_mpp": list(out_mpp),
        "output_size": list(geom.out_size),
        "threshold": settings.threshold,
        "sigma": settings.sigma,
        "tissue": {"source": tissue.source, "threshold": tissue.threshold,
                   "area_mm2": round(tissue.area_px() * slide.mpp[0] * slide.mpp[1] / 1e6, 4),
                   "overview_downsample": tissue.downsample[0]},
        "tiles": n,
        "tiles_total": geom.grid[0] * geom.grid[1],
        "tumour_area_mm2": round(stitcher.tumour_px * out_px_area_mm2, 4),
        "tumour_fraction_of_tissue": round(stitcher.tumour_px / tissue_px, 6) if tissue_px else 0.0,
        "mean_probability_in_tissue": round(stitcher.prob_sum_tissue / tissue_px, 6) if tissue_px else 0.0,
        "polygons": len(polys),
        "polygon_area_mm2": round(sum(areas) / 1e6, 4),
        "min_area_um2": settings.min_area_um2,
        "seconds": round(total_s, 3),
        "inference_seconds": round(infer_s, 3),
        "tiles_per_second": round(n / infer_s, 3) if infer_s > 0 else None,
        "tissue_megapixels_per_second": round(tissue_model_mpx / total_s, 4) if total_s > 0 else None,
        "workers": workers,
        "batch_size": job.batch_size,
        "device": str(lm.device),
        "backend": lm.backend,
        "files": list(OUTPUT_FILES),
        "overlay_legend": dict(SLIDE_OVERLAY_LEGEND),
    }


# --------------------------------------------------------------------------------------------- helpers


def map_on_grid(arr: np.ndarray, size: tuple[int, int], ratio: tuple[float, float], how: str = "mean",
                band: int = 512) -> np.ndarray:
    """A (possibly memory-mapped) uint8 map (H, W[, 3]) resampled onto a grid of `size` (w, h) whose cells are
    `ratio` (x, y) map px, both grids starting at the map's origin.

    Reduced first by an integer factor band by band (mean, or max for masks: small tumours stay visible),
    then resized (bilinear; nearest for max); the map is edge-padded where the grid reaches beyond it.
    """
    f = max(1, int(min(ratio)))
    if f > 1:
        H, W = arr.shape[:2]
        rows = []
        for y in range(0, H // f * f, band * f):
            block = np.asarray(arr[y:min(y + band * f, H // f * f), :W // f * f])
            b = block.reshape(block.shape[0] // f, f, block.shape[1] // f, f, *block.shape[2:])
            rows.append(b.max(axis=(1, 3)) if how == "max" else b.mean(axis=(1, 3)).round().astype(np.uint8))
        small = np.concatenate(rows, 0) if rows else np.zeros((1, 1, *arr.shape[2:]), np.uint8)
    else:
        small = np.asarray(arr)
    rx, ry = ratio[0] / f, ratio[1] / f
    need_h, need_w = math.ceil(size[1] * ry), math.ceil(size[0] * rx)
    pad = ((0, max(0, need_h - small.shape[0])), (0, max(0, need_w - small.shape[1])))
    if any(p[1] for p in pad):
        small = np.pad(small, pad + ((0, 0),) * (small.ndim - 2), mode="edge")
    resample = Image.Resampling.NEAREST if how == "max" else Image.Resampling.BILINEAR
    box = (0.0, 0.0, size[0] * rx, size[1] * ry)
    return np.asarray(Image.fromarray(small).resize(size, resample, box=box, reducing_gap=None))


def _file_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise IkdmilError(f"{path}: cannot be read ({one_line(exc)}); check the path and its permissions") from None
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _settings_key(lm: LoadedModel, settings: PredictSettings, slide_path: Path) -> str:
    relevant = settings.to_dict()
    for k in RUNTIME_SETTINGS:
        relevant.pop(k, None)
    h = hashlib.sha256()
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    h.update(_file_key(lm.path).encode())
    h.update(_file_key(slide_path).encode())
    h.update(str(lm.mpp).encode())
    if lm.reach is not None:  # large tiles (a different, more exact map than small tiles gave)
        h.update(f"large tiles, reach {lm.reach}, stride {lm.net_stride}".encode())
    return h.hexdigest()[:16]


def is_done(lm: LoadedModel, slide_path: Path, out_dir: Path, settings: PredictSettings) -> bool:
    """Whether `predict_slide` would skip this slide: done into `out_dir` with these settings, no --overwrite."""
    if settings.overwrite:
        return False
    try:
        return finished_summary(out_dir, _settings_key(lm, settings, slide_path)) is not None
    except IkdmilError:  # unreadable slide or model file: predict_slide reports it
        return False


def finished_summary(out_dir: Path, key: str) -> dict | None:
    """The summary of an earlier run of this slide with the same settings key, else None."""
    done = out_dir / SUMMARY_NAME
    if not done.is_file():
        return None
    try:
        old = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and old.get("settings_key") == key else None


def _no_tiles(slide_path: Path, slide: Slide, settings: PredictSettings, tissue: TissueMap,
              user_mask: str | None) -> str:
    """Why no tile of a slide holds tissue, and what to do (the slide then fails: nothing to segment)."""
    if tissue.mask.any():
        return (f"{slide_path}: no tile holds more than --min-tissue {settings.min_tissue:g} of tissue, so nothing "
                "was segmented; lower --min-tissue")
    if user_mask is not None:
        w, h = slide.dimensions
        return (f"{slide_path}: the tissue mask {user_mask} marks no tissue on the slide (it is empty, or its "
                f"polygons lie outside the slide's {w} x {h} px); give this slide's mask, or drop --tissue-mask")
    thr = f" above the saturation threshold {tissue.threshold:.3f}" if tissue.threshold is not None else ""
    return (f"{slide_path}: no tissue found{thr}, so nothing was segmented; if the slide has tissue, pass a lower "
            "--tissue-threshold, a --tissue-mask, or --all-tissue")


def _user_mask_for(settings: PredictSettings, slide_path: Path) -> str | None:
    if not settings.tissue_mask:
        return None
    p = Path(settings.tissue_mask)
    if p.is_dir():
        for ext in (".geojson", ".json", ".png", ".tif", ".tiff", ".jpg", ".bmp"):
            cand = p / (slide_path.stem + ext)
            if cand.is_file():
                return _check_mask_image(cand)
        raise IkdmilError(
            f"{p}: no tissue mask for {slide_path.name} (expected {slide_path.stem}.geojson or {slide_path.stem}.png); "
            "add it or drop --tissue-mask"
        )
    return _check_mask_image(p)


def _check_mask_image(path: Path) -> str:
    """A tissue mask image is decoded whole: refuse one above `max_image_pixels()` before decoding it."""
    from ikdmil.io import MAX_PIXELS_ENV, max_image_pixels

    if not path.is_file() or path.suffix.lower() in (".geojson", ".json"):
        return str(path)  # a GeoJSON file, or a missing one (reported by the tissue module)
    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, ValueError, SyntaxError):
        return str(path)  # unreadable: reported by the tissue module
    limit = max_image_pixels()
    if w * h > limit:
        raise IkdmilError(
            f"{path}: tissue mask header says {w} x {h} px, above the {limit / 1e6:.3g} Mpx limit for mask images; "
            f"save the mask smaller (any scale of the slide will do), or raise the limit with {MAX_PIXELS_ENV}=N"
        )
    return str(path)
