"""`ikdmil predict`: the batch driver over slides, large images and patch images, and its report.

Every input (a file, or a folder of slides/images) is classified as a *slide* (OpenSlide formats,
and plain images larger than `PredictSettings.patch_max`) or a *patch* (smaller plain images):

- slides are segmented one by one into OUT/NAME/ by `ikdmil.inference.slide.predict_slide` (tiled
  in model space; see that module for the outputs); a slide that fails is recorded and the batch
  goes on, and one already done with the same settings is skipped;
- patch images are treated like training images: rescaled *isotropically* to the model's scale
  (`patch_scale`: never squeezed to a square), tiled by square tiles of the model's input size as in
  evaluation, the stitched map rescaled back and thresholded; OUT/masks/NAME.png and
  OUT/overlays/NAME.png are written, and OUT/patches.json lists each image's tumour fraction and the
  scale it was read at.

OUT/predict_config.yaml records the model, inputs and settings; OUT/predict_summary.json lists
every slide (with its warnings), the number of patches and every failure; OUT/report.html shows them on
one page with each slide's overlay (`ikdmil.inference.report`). Several runs into one OUT add to these files
(merged under a lock; a run with other settings gets predict_config-2.yaml, ...), and predict never
replaces or writes into a folder it did not write: see `ikdmil.inference.outputs` for the rules per
file. The index files are written even when a run is interrupted, listing what it finished.
Progress lines go to the ``ikdmil.inference`` logger (level INFO) unless the caller passes `echo`.

An input that is missing, unreadable or implausible (see `ikdmil.inference.slide`), or whose output
folder is not predict's, fails on its own with a one-line message; the batch goes on.

Under torchrun (``torchrun --nproc_per_node N -m ikdmil predict ...``, any number of nodes sharing
OUT) every rank runs the model on its own device (GPU LOCAL_RANK on CUDA, gloo on CPU) over its
share of the inputs: rank 0 shares the slides by their level-0 area, longest first, onto the rank
with the least work (`shard_by_size`; slides already done weigh nothing) and sends the shares to
all, so every rank agrees whatever its view of the disk. Each rank writes only its slides' folders
and its patch images; rank 0 alone writes predict_config.yaml and, once every rank has sent it its
results, the merged index files, whose slide entries then name the ``rank`` that did each slide.
A rank that fails merges its own results into the index files (under the lock) before it stops; the
next run lists every finished slide folder either way and skips those slides, with any world size.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ikdmil import __version__
from ikdmil.device import Distributed, setup_distributed
from ikdmil.errors import IkdmilError
from ikdmil.inference.model import LoadedModel, gaussian_smooth, load_for_inference
from ikdmil.inference.outputs import CONFIG_NAME, PATCH_FOLDERS, merge_indexes, record_config, take_patch_folders
from ikdmil.inference.report import write_report
from ikdmil.inference.settings import PredictSettings
from ikdmil.inference.slide import is_done, predict_slide
from ikdmil.inference.tiling import resolve_tiling
from ikdmil.io import one_line, read_rgb, remove_stale_temps, write_png
from ikdmil.slide.reader import PLAIN_SUFFIXES, expand_inputs, image_mpp, is_plain_image, level0_area
from ikdmil.stain import MacenkoReference, ReinhardReference, measure_reference, normalise_rgb, reduce_rgb

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "PredictReport", "predict", "shard_by_size"]


@dataclass
class PredictReport:
    """What `predict` did: per-slide summaries, per-patch results, failures, the config file written.

    Under torchrun, rank 0's report holds every rank's results; the other ranks' hold their own.
    """

    slides: list[dict]
    patches: list[dict]
    failures: list[tuple[str, str]]  # (input, one-line message)
    config_path: Path
    rank: int = 0
    world: int = 1


def predict(model: str | os.PathLike, inputs: list[str | os.PathLike], out: str | os.PathLike,
            settings: PredictSettings | None = None, progress: bool = True,
            echo: Callable[[str], object] | None = None) -> PredictReport:
    """Segment every input (slides, large images, patch images, folders of them) into `out`.

    A failing input is recorded and the batch goes on; the caller decides the exit status from
    `report.failures`.

    Args:
        model: a model file written by ``ikdmil train`` (``.safetensors`` or ``.pt``).
        inputs: slide files, plain images, or folders of them (not recursive).
        out: the output folder (created); one subfolder per slide, ``masks/`` and ``overlays/`` for
            patch images, ``predict_config.yaml`` and ``predict_summary.json``. It may hold earlier
            runs' outputs (added to) and the user's files (never replaced): see
            `ikdmil.inference.outputs`.
        settings: every option of ``ikdmil predict``; None: the defaults.
        progress: show tqdm progress bars.
        echo: called with one line per slide and one for the patch images; None: the lines go to
            this module's logger at INFO level (the CLI passes ``print``).

    Returns:
        A `PredictReport` with the slide summaries (``summary.json`` contents plus ``"status"``:
        ``"done"`` or ``"skipped"``), the patch results and the failures as (input, message).

    Raises:
        IkdmilError: for errors that concern the whole batch (no inputs, bad options, an
            unreadable model, `out` is a file), with a one-line message.

    Example:
        >>> from ikdmil.inference import PredictSettings, predict
        >>> report = predict("run/model.safetensors", ["slides/"], "out", PredictSettings(mpp=0.25))
        >>> [s["tumour_area_mm2"] for s in report.slides], report.failures
        ([1.234], [])
    """
    settings = (settings or PredictSettings()).validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IkdmilError(f"{out}: exists and is a file; choose an output folder")
    paths = expand_inputs(list(inputs))
    if not paths:
        raise IkdmilError("no inputs given; pass slides, images or folders of them")
    _check_names(paths)
    dist, device = setup_distributed(settings.device)
    lm = load_for_inference(model, settings, device)
    resolve_tiling(settings.tile_size or lm.input_size, settings.overlap, settings.out_stride)  # option errors first
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, *(out / name for name in PATCH_FOLDERS)):
        remove_stale_temps(folder)  # what killed runs left; temporaries of live runs are kept
    config_name = write_config(out, Path(model), paths, settings, lm).name if dist.is_main else None
    report = PredictReport([], [], [], out / dist.broadcast(config_name), dist.rank, dist.world)

    kinds = {p: classify_input(p, settings) for p in paths}
    slide_paths = [p for p in paths if kinds[p] == "slide"]
    patch_paths = [p for p in paths if kinds[p] == "patch"]
    folders_problem = None  # why OUT/masks or OUT/overlays cannot take patch outputs
    say = echo or logger.info
    if dist.world > 1:
        slide_paths, patch_paths, folders_problem = _my_share(dist, lm, out, settings, slide_paths, patch_paths)
        progress = progress and dist.is_main
        say = _with_rank(say, dist)
    patch_folders_ok = finished = False
    try:
        predict_slides(lm, slide_paths, out, settings, progress, say, report.slides, report.failures,
                       rank=dist.rank if dist.world > 1 else None)
        if patch_paths and dist.world == 1:
            folders_problem = _take_patch_folders(out)
        if folders_problem:  # no patch image is written (rank 0 reports it once)
            report.failures.extend([(str(out / "masks"), folders_problem)] if dist.is_main else [])
        elif patch_paths:
            patch_folders_ok = True
            bad = predict_patches(lm, patch_paths, out, settings, progress, report.patches)
            report.failures.extend((str(p), _naming(p, m)) for p, m in bad)
            say(f"{len(report.patches)} patch images: masks in {out / 'masks'}, overlays in {out / 'overlays'}")
        finished = True
    finally:  # also when interrupted: the index lists what this run finished
        _write_indexes(dist, out, report, patch_folders_ok, gather=finished)
    return report


def shard_by_size(sizes: list[int], world: int) -> list[list[int]]:
    """Indices of `sizes` per rank, balanced: largest first onto the least-loaded rank.

    Ties go to the rank with fewer items, then the lower rank (so items of size 0, such as slides
    already done, are dealt out in turn). Deterministic; every index lands on exactly one rank, in
    ascending order within it.

    Example:
        >>> shard_by_size([5, 1, 4, 2, 3], 2)
        [[0, 1, 3], [2, 4]]
    """
    load = [0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], len(shares[r]), r))
        shares[r].append(i)
        load[r] += sizes[i]
    return [sorted(share) for share in shares]


def _my_share(dist: Distributed, lm: LoadedModel, out: Path, settings: PredictSettings, slides: list[Path],
              patches: list[Path]) -> tuple[list[Path], list[Path], str | None]:
    """This rank's slides and patch images, and why the patch folders cannot be used (None: they can).

    Rank 0 weighs the slides (level-0 area; 0 when already done), takes the patch folders and sends
    the plan to every rank, so the ranks agree even when they see the disk differently.
    """
    plan = None
    if dist.is_main:
        work = [0 if is_done(lm, p, out / p.stem, settings) else level0_area(p) for p in slides]
        plan = (shard_by_size(work, dist.world), shard_by_size([1] * len(patches), dist.world),
                _take_patch_folders(out) if patches else None)
    slide_shares, patch_shares, problem = dist.broadcast(plan)
    return [slides[i] for i in slide_shares[dist.rank]], [patches[i] for i in patch_shares[dist.rank]], problem


def _with_rank(say: Callable[[str], object], dist: Distributed) -> Callable[[str], object]:
    return lambda line: say(f"rank {dist.rank}/{dist.world}: {line}")


def _take_patch_folders(out: Path) -> str | None:
    """Mark OUT/masks and OUT/overlays as predict's; the one-line reason when they are not, else None."""
    try:
        take_patch_folders(out)
    except IkdmilError as exc:  # masks/ or overlays/ is not predict's
        return " ".join(str(exc).split())
    return None


def _write_indexes(dist: Distributed, out: Path, report: PredictReport, patch_folders_ok: bool,
                   gather: bool) -> None:
    """Merge the run's results into the index files: rank 0 for every rank when `gather`, else each rank its own.

    `gather` is False when this rank stopped on an error or an interrupt: the other ranks may never
    reach the gather, so it merges its own results under the lock, as concurrent runs into OUT do.
    """
    done = [Path(s["path"]) for s in report.slides if s.get("path")] + [Path(e["image"]) for e in report.patches]
    done += [out / "masks"] if patch_folders_ok else []
    if dist.world > 1 and gather:
        parts = dist.gather((report.slides, report.patches, report.failures, done))
        if not dist.is_main:
            return
        report.slides[:] = [s for part in parts for s in part[0]]
        report.patches[:] = [e for part in parts for e in part[1]]
        report.failures[:] = [f for part in parts for f in part[2]]
        done = [d for part in parts for d in part[3]]
    merge_indexes(out, report.slides, report.patches, report.failures, done, report.config_path.name)
    write_report(out)


def predict_slides(lm: LoadedModel, paths: list[Path], out: Path, settings: PredictSettings, progress: bool,
                   say: Callable[[str], object], slides: list[dict] | None = None,
                   failures: list[tuple[str, str]] | None = None,
                   rank: int | None = None) -> tuple[list[dict], list[tuple[str, str]]]:
    """Each slide into out/NAME/, one at a time; returns (summaries, failures as (input, one-line message)).

    `slides` and `failures`: lists to append to as slides finish (so an interrupted batch keeps them).
    `rank`: the torchrun rank, recorded as each summary's "rank" (None: not recorded).
    """
    slides = [] if slides is None else slides
    failures = [] if failures is None else failures
    for n, p in enumerate(paths, 1):
        try:
            s = predict_slide(lm, p, out / p.stem, settings, progress)
            if rank is not None:
                s["rank"] = rank
            slides.append(s)
            if s.get("status") == "skipped":
                say(f"[{n}/{len(paths)}] {p.name}: already done with these settings, skipped "
                    f"({out / p.stem}; --overwrite to redo)")
            else:
                say(f"[{n}/{len(paths)}] {p.name}: {s['tiles']} tiles, tumour {s['tumour_area_mm2']:.3f} mm² "
                    f"({100 * s['tumour_fraction_of_tissue']:.1f} % of tissue), {s['polygons']} polygons, "
                    f"{s['seconds']:.1f} s -> {out / p.stem}")
        except KeyboardInterrupt:
            raise
        except IkdmilError as exc:
            failures.append((str(p), _naming(p, str(exc))))
        except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the batch
            failures.append((str(p), f"{p}: failed ({type(exc).__name__}: {one_line(exc)})"))
    return slides, failures


def _naming(path: Path, message: str) -> str:
    """`message` on one line, led by the input's path unless it names it (e.g. an error about the model)."""
    message = " ".join(message.split())
    return message if str(path) in message else f"{path}: {message}"


def patch_scale(lm: LoadedModel, settings: PredictSettings, path: Path, shape: tuple[int, int]
                ) -> tuple[float, str]:
    """(model px per patch px, where it comes from) for the patch at `path` of (h, w) `shape`, one
    factor for x and y, the first of:

    - `--mpp` (the patches' µm/px) over the model's µm/px, as for slides;
    - the image's own resolution (TIFF tags, PNG/JPEG dpi; screen-dpi defaults are ignored) over the
      model's µm/px, when the model file states its µm/px;
    - a model trained on data without mpp: the pixel factor its training images were rescaled by;
    - otherwise the patch is taken to be like a training image, whose median short side the model's
      scale maps to its input size (`ikdmil.data.scale.choose_scale`): short side -> input size.
    """
    if settings.mpp is not None:
        return settings.mpp / lm.mpp, "--mpp"
    own = image_mpp(path)
    if own is not None and not lm.mpp_source.startswith("default"):
        return (own[0] + own[1]) / 2 / lm.mpp, "the image's resolution metadata"
    factor = lm.meta.get("scale")
    if isinstance(factor, int | float) and factor > 0:
        return float(factor), "the model file's scale"
    return lm.input_size / min(shape), "short side = the model's input size (give --mpp for the patches' µm/px)"


def predict_patches(lm: LoadedModel, paths: list[Path], out: Path, settings: PredictSettings,
                    progress: bool = True, results: list[dict] | None = None) -> list[tuple[Path, str]]:
    """Masks and overlays for patch images, appended to `results`; returns the failures.

    Each patch is rescaled by `patch_scale` (normalised by its own stain statistics with
    --stain-normalise), padded white to at least one tile and tiled like an evaluation image
    (`ikdmil.engine.evaluate.tiled_maps`, tiles smoothed as a slide's); the map is rescaled back.
    OUT/masks and OUT/overlays must be predict's (`ikdmil.inference.outputs.take_patch_folders`).
    """
    from ikdmil.data.dataset import resize_rgb
    from ikdmil.data.scale import scaled_shape
    from ikdmil.engine.evaluate import tiled_maps
    from ikdmil.visualize import heatmap, overlay, side_by_side

    tile = settings.tile_size or lm.input_size
    results = [] if results is None else results
    failures = []

    def smoothed(x: torch.Tensor) -> torch.Tensor:
        return gaussian_smooth(lm.fused(x), settings.sigma)

    for p in tqdm(paths, desc="patches", unit="img", disable=not progress, leave=False):
        try:
            img = read_rgb(p)
            h, w = img.shape[:2]
            factor, source = patch_scale(lm, settings, p, (h, w))
            sh, sw = scaled_shape((h, w), factor)
            scaled = resize_rgb(img, (sh, sw))
            if lm.stain_reference is not None:
                scaled = normalise_patch(scaled, lm.stain_reference)
            canvas = np.full((1, max(sh, tile), max(sw, tile), 3), 255, np.uint8)
            canvas[0, :sh, :sw] = scaled
            prob = tiled_maps(smoothed, canvas, np.array([[sh, sw]]), tile, lm.batch_size)[0, :sh, :sw]
        except IkdmilError as exc:  # unreadable image, or non-finite model output
            failures.append((p, str(exc)))
            continue
        full = np.asarray(Image.fromarray(prob).resize((w, h), Image.Resampling.BILINEAR))
        pred = full >= settings.threshold
        write_png(out / "masks" / f"{p.stem}.png", pred)
        write_png(out / "overlays" / f"{p.stem}.png", side_by_side(overlay(img, pred), heatmap(full)))
        results.append({"image": str(p), "width": w, "height": h, "threshold": settings.threshold,
                        "model_px_per_image_px": round(factor, 6), "scale_source": source,
                        "tumour_fraction": round(float(pred.mean()), 6),
                        "max_probability": round(float(full.max()), 6)})
    return failures


def normalise_patch(rgb: np.ndarray, reference: ReinhardReference | MacenkoReference) -> np.ndarray:
    """--stain-normalise for a uint8 (H,W,3) patch: mapped by its own statistics (measured, like the
    reference, `reference.downsample` times smaller); a patch without (enough) stained tissue is left as it is."""
    source = measure_reference(reference.method, reduce_rgb(rgb, reference.downsample))
    return rgb if source is None else normalise_rgb(rgb, source, reference)


def classify_input(path: Path, settings: PredictSettings) -> str:
    """'slide' or 'patch' for an input (errors surface later, when it is opened)."""
    if settings.mode != "auto":
        if settings.mode == "patch" and path.suffix.lower() not in PLAIN_SUFFIXES:
            return "slide"
        return settings.mode
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_config(out: Path, model: Path, inputs: list[Path], settings: PredictSettings, lm: LoadedModel) -> Path:
    """OUT/predict_config.yaml (or predict_config-N.yaml for other settings): the model, its resolution,
    the inputs and every setting; see `ikdmil.inference.outputs.record_config`."""
    cfg = {
        "command": "predict",
        "ikdmil_version": __version__,
        "model": str(model.resolve()),
        "model_sha256": _sha256(model),
        "model_backbone": lm.meta.get("backbone"),
        "model_input_size": lm.input_size,
        "model_mpp": lm.mpp,
        "model_mpp_source": lm.mpp_source,
        "device": str(lm.device),
        "inputs": [str(p.resolve()) for p in inputs],
        "settings": settings.to_dict(),
    }
    return record_config(out, cfg)
