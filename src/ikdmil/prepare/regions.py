"""Prepare training images from regions a pathologist drew on slides (QuPath annotations or a CSV of boxes).

Labels (LABELS), coordinates in level-0 slide pixels:

- QuPath GeoJSON ("File > Export objects as GeoJSON"): a FeatureCollection or a list of Features, one
  file per slide named after it (``slide1.geojson`` or ``slide1.svs.geojson``), or a folder of them.
  An annotation's class is ``properties.classification.name`` (older exports: a ``classification``
  with ``name``, or a plain text); Polygon and MultiPolygon areas are regions. Detections and cells,
  points and lines are skipped (counted in the summary).
- a CSV with the header ``slide,x,y,w,h,label``: one box per row, label a class name or 1 / 0.

Classes (read in `ikdmil.prepare.region_labels`): `DEFAULT_CLASSES` maps ``Tumor`` / ``Tumour`` /
``1`` to 1 ("this region contains tumour"), ``Normal`` / ``0`` to 0 ("no tumour anywhere in it") and
QuPath's ``Ignore*`` / ``Region*`` to skip, any case. ``Stroma`` and other classes have no default:
stroma drawn beside a tumour may hold tumour cells, so the user says what it means. ``--classes
"Stroma=0,Necrosis=skip"`` adds to (or overrides) the defaults; annotations without a class are named
``Unclassified``. A class name with no mapping stops the preparation with the list of every unknown name.

The label rule (why it differs by class): "no tumour here" holds for every part of a Normal region,
but "tumour in here" does not hold for every part of a Tumor region.

- Normal: the region's bounding box is cut into `patch_size` px tiles (evenly spread, see
  `crop_positions`; a side shorter than a tile gives one tile of that side). A tile is a negative when
  at least `normal_min_inside` of it lies inside the drawn outline (the rest is unlabelled tissue
  that may hold tumour) and it overlaps no Tumor region of the slide.
- Tumor, up to `max_size` px on its longer side: kept whole as one positive image (its bounding box
  holds the whole region, hence its tumour); training takes crops of it.
- Tumor, larger: tiled as above; a tile is a positive when at least `min_tumour_overlap` of it lies
  inside the outline, and dropped otherwise (not a negative: it may hold tumour). Such a tile may
  still hold no tumour when the outline is loose: a warning counts the tiled regions and their tiles.
- Every image with more than `max_background` background (tissue detection on an overview, see
  `ikdmil.slide.tissue`) or with a side below `min_size` px is dropped.

Negatives from whole slides: `normal_slides` names slides without tumour (one name per line, or a CSV
with a ``slide`` column); their tissue is tiled on a `patch_size` grid and up to
`max_tiles_per_slide` tiles per slide are drawn by `seed` (Normal regions drawn on such a slide add
nothing: the whole slide is tiled).

Resolution: images are written at `mpp` µm/px (default 0.5, 20x), read from the nearest finer pyramid
level and downsampled (`read_scaled`); the slide's µm/px is its metadata's, or `slide_mpp`. The
manifest's ``mpp`` column records it. Splits are by slide, never one slide's images in two splits:
`val_fraction` / `test_fraction` of the slides with tumour regions and of those without, by `seed`.

Output: ``OUT/{split}/{pos,neg}/SLIDE_rN_xX_yY.png`` (region N of the slide kept whole; ``..._rN_tK_...``
tile K of it; ``SLIDE_xX_yY`` a tile of a normal slide; X, Y the level-0 top-left), ``OUT/manifest.csv``
and ``OUT/regions_summary.json`` (settings, classes, splits, counts). No masks: the labels are
image-level. Resumable slide by slide (see `ikdmil.prepare.common`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tqdm.auto import tqdm

from ikdmil.errors import IkdmilError
from ikdmil.prepare.common import (
    ResumableOutput,
    counts,
    crop_positions,
    files_by_stem,
    format_counts,
    natural_key,
    safe_name,
    save_patch_image,
    split_by_class,
)
from ikdmil.prepare.region_labels import (
    Region,
    apply_classes,
    classes_problem,
    parse_classes,
    read_labels,
    read_normal_slides,
    slide_key,
)
from ikdmil.slide.reader import INPUT_SUFFIXES, open_slide, read_scaled
from ikdmil.slide.tissue import TissueParams, slide_tissue
from ikdmil.typed_settings import Opt, check_settings

log = logging.getLogger(__name__)

PREPARER_ID = "ikdmil.prepare.regions"
SUMMARY_NAME = "regions_summary.json"
_EDGE_TOLERANCE = 1.0  # level-0 px a region may stick out of the slide (QuPath's own rounding)


@dataclass
class RegionsOptions:
    """Every option of `ikdmil prepare regions` (see the module docstring for the label rule)."""

    mpp: float = 0.5
    patch_size: int = 512
    max_size: int = 1024
    min_tumour_overlap: float = 0.5
    normal_min_inside: float = 0.95
    min_size: int = 64
    max_background: float = 0.8
    classes: str = ""
    normal_slides: str | None = None
    max_tiles_per_slide: int = 100
    slide_mpp: float | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    image_format: str = "png"
    tissue: TissueParams = field(default_factory=TissueParams)

    OPTIONS: ClassVar[dict[str, Opt]] = {
        "mpp": Opt("µm/px of the images written", above=0),
        "patch_size": Opt("tile side (px at --mpp) when a region is tiled", min=16),
        "max_size": Opt("a Tumor region up to this many px (at --mpp) on its longer side is one image; a larger "
                        "one is tiled and a tile is positive only when --min-tumour-overlap of it is inside the "
                        "outline (a tile of a tumour region may hold no tumour: draw tumour regions tightly)", min=16),
        "min_tumour_overlap": Opt("share of a tile of a large Tumor region inside its outline for the tile to be a "
                                  "positive (others are dropped, never negatives)", above=0, max=1),
        "normal_min_inside": Opt("share of a tile of a Normal region inside its outline for the tile to be a "
                                 "negative (the rest of its box is unlabelled)", above=0, max=1),
        "min_size": Opt("drop images with a side shorter than this (px at --mpp)", min=1),
        "max_background": Opt("drop images with more background than this", min=0, max=1),
        "classes": Opt("class name mapping added to the defaults Tumor/Tumour=1, Normal=0, Ignore*/Region*=skip, "
                       "e.g. \"Stroma=0,Necrosis=skip\" (any case; Unclassified: annotations without a class)",
                       check=classes_problem, metavar="NAME=1|0|skip,..."),
        "normal_slides": Opt("file of slide names without tumour (one per line, or a CSV with a slide column): "
                             "negatives tiled from their tissue", metavar="FILE"),
        "max_tiles_per_slide": Opt("at most this many negative tiles per --normal-slides slide (0 = all)", min=0),
        "slide_mpp": Opt("µm per level-0 px of slides whose metadata has none (e.g. 0.25 for 40x)", above=0),
        "val_fraction": Opt("share of slides for validation", min=0, below=1),
        "test_fraction": Opt("share of slides for test", min=0, below=1),
        "seed": Opt("seed of the split and of the tiles drawn from normal slides", min=0),
        "image_format": Opt("image format", choices=("png", "jpg")),
        "tissue": Opt("tissue detection (saturation threshold + morphology on an overview)"),
    }

    def validate(self) -> RegionsOptions:
        check_settings(self)
        if self.val_fraction + self.test_fraction >= 1:
            raise IkdmilError("--val-fraction and --test-fraction must sum to less than 1")
        if self.patch_size > self.max_size:
            raise IkdmilError(f"--patch-size ({self.patch_size}) must not exceed --max-size ({self.max_size})")
        self.tissue.validate()
        return self

    def class_map(self) -> dict[str, int | str]:
        return parse_classes(self.classes)


def find_slides(slides: Path) -> dict[str, Path]:
    """Slide key -> file, for a folder of slides (any depth) or one slide file."""
    if slides.is_file():
        return {slide_key(slides.name): slides}
    if not slides.is_dir():
        raise IkdmilError(f"{slides}: slides folder not found; check the path")
    found = {slide_key(k): p for k, p in files_by_stem(slides, INPUT_SUFFIXES).items()}
    if not found:
        raise IkdmilError(f"{slides}: no slides ({', '.join(INPUT_SUFFIXES)}) found; check the path")
    return found


def _check_named(wanted: dict[str, str], files: dict[str, Path], slides_dir: Path) -> None:
    """`wanted`: slide key -> the file naming it. Every slide named must be in SLIDES (one error for all)."""
    missing = sorted((k for k in wanted if k not in files), key=natural_key)
    if missing:
        have = ", ".join(sorted(files, key=natural_key)[:8]) + (", ..." if len(files) > 8 else "")
        raise IkdmilError(f"{wanted[missing[0]]}: names slide(s) {', '.join(missing)} that {slides_dir} does not "
                          f"hold (it has {have}); add the slide(s) or remove their labels")


def _check_inside(regions: list[Region], dims: tuple[int, int], path: Path) -> None:
    W, H = dims
    t = _EDGE_TOLERANCE
    for r in regions:
        x0, y0, x1, y1 = r.geom.bounds
        if x0 < -t or y0 < -t or x1 > W + t or y1 > H + t:
            raise IkdmilError(
                f"{r.where}: region {r.number} ({r.name}, x {x0:.0f}-{x1:.0f}, y {y0:.0f}-{y1:.0f} px) lies outside "
                f"the slide {path.name} ({W} x {H} px at level 0); export the labels from this slide's QuPath image "
                "(coordinates in level-0 pixels), or fix the region")


@dataclass
class _Slide:
    key: str
    path: Path
    regions: list[Region]
    normal: bool  # listed in --normal-slides
    split: str = ""
    dims: tuple[int, int] = (0, 0)
    mpp: tuple[float, float] = (0.0, 0.0)
    mpp_source: str = ""

    @property
    def tumour(self) -> bool:
        return any(r.label == 1 for r in self.regions)


def _inspect(s: _Slide, opts: RegionsOptions) -> None:
    """Open the slide once before any work: its size and µm/px, and that its regions lie inside it."""
    with open_slide(s.path, mpp=opts.slide_mpp) as slide:
        if slide.mpp is None:
            raise IkdmilError(f"{s.path}: no resolution (µm/px) in the slide's metadata; pass --slide-mpp "
                              "(µm per level-0 pixel, e.g. 0.25 for a 40x scan, 0.5 for 20x)")
        s.dims, s.mpp, s.mpp_source = slide.dimensions, slide.mpp, slide.mpp_source
    if opts.mpp < min(s.mpp) * 0.99:
        log.warning("%s: scanned at %.3g µm/px, coarser than --mpp %g: its images are upsampled (blurred); "
                    "give a --mpp of at least the slides' own", s.path, min(s.mpp), opts.mpp)
    _check_inside(s.regions, s.dims, s.path)
    if s.normal and s.tumour:
        raise IkdmilError(f"{opts.normal_slides}: lists {s.key} as normal, but its labels have Tumor regions "
                          f"({s.regions[0].where}); remove it from one of them")


# ----------------------------------------------------------------------------------------- the label rule


@dataclass
class Piece:
    """One image to write: level-0 box, output size (px at `mpp`), label, share inside its region."""

    box: tuple[float, float, float, float]
    size: tuple[int, int]
    label: int
    inside: float
    stem: str
    background: float = 0.0


def _tiles(bounds, ds: tuple[float, float], tile: int) -> list[tuple[tuple, tuple[int, int]]]:
    """Evenly spread `tile` px boxes (at the output scale) covering level-0 `bounds`; (level-0 box, size)."""
    x0, y0, x1, y1 = bounds
    W, H = round((x1 - x0) / ds[0]), round((y1 - y0) / ds[1])
    tw, th = min(tile, W), min(tile, H)
    return [((x0 + px * ds[0], y0 + py * ds[1], tw * ds[0], th * ds[1]), (tw, th))
            for py in crop_positions(H, tile) for px in crop_positions(W, tile)]


def plan_region(region: Region, ds: tuple[float, float], opts: RegionsOptions, tumour=None,
                stats: Counter | None = None) -> list[Piece]:
    """The images of one region under the label rule (module docstring); `tumour`: the union of the
    slide's Tumor regions (Normal tiles overlapping it are dropped); `stats` counts what was done."""
    from shapely.geometry import box as sbox
    from shapely.prepared import prep

    stats = stats if stats is not None else Counter()
    x0, y0, x1, y1 = region.geom.bounds
    longest = max((x1 - x0) / ds[0], (y1 - y0) / ds[1])
    whole = region.label == 1 and longest <= opts.max_size
    if whole:
        boxes = [((x0, y0, x1 - x0, y1 - y0), (round((x1 - x0) / ds[0]), round((y1 - y0) / ds[1])))]
    else:
        boxes = _tiles(region.geom.bounds, ds, opts.patch_size)
    geom, pieces = prep(region.geom), []
    for k, (b, size) in enumerate(boxes):
        if min(size) < opts.min_size:
            stats["too_small"] += 1
            continue
        shape = sbox(b[0], b[1], b[0] + b[2], b[1] + b[3])
        inside = region.geom.intersection(shape).area / shape.area if geom.intersects(shape) else 0.0
        if region.label == 0 and inside < opts.normal_min_inside:
            stats["normal_tiles_outside_outline"] += 1
            continue
        if region.label == 0 and tumour is not None and tumour.intersection(shape).area > 0:
            stats["normal_tiles_touching_tumour"] += 1
            continue
        if region.label == 1 and not whole and inside < opts.min_tumour_overlap:
            stats["tumour_tiles_below_overlap"] += 1
            continue
        stem = f"{safe_name(region.slide)}_r{region.number}" + ("" if whole else f"_t{k}")
        pieces.append(Piece(b, size, int(region.label), round(inside, 4), f"{stem}_x{b[0]:.0f}_y{b[1]:.0f}"))
    if region.label == 1 and not whole:
        stats["tumour_regions_tiled"] += 1
        stats["tumour_tiles_positive"] += len(pieces)
    return pieces


def _normal_slide_tiles(s: _Slide, ds: tuple[float, float], tissue, opts: RegionsOptions) -> list[Piece]:
    """Negatives of a --normal-slides slide: a grid of tiles over its tissue, at most max_tiles_per_slide."""
    T = opts.patch_size
    W, H = s.dims
    cands = []
    for j in range(int(H / ds[1] // T)):
        for i in range(int(W / ds[0] // T)):
            b = (i * T * ds[0], j * T * ds[1], T * ds[0], T * ds[1])
            bg = 1.0 - tissue.fraction(*b)
            if bg <= opts.max_background:
                cands.append(Piece(b, (T, T), 0, 1.0, f"{safe_name(s.key)}_x{b[0]:.0f}_y{b[1]:.0f}", round(bg, 4)))
    random.Random(f"{opts.seed}:{s.key}").shuffle(cands)
    if opts.max_tiles_per_slide:
        cands = cands[:opts.max_tiles_per_slide]
    return sorted(cands, key=lambda p: (p.box[1], p.box[0]))


# ------------------------------------------------------------------------------------------------ writing


def _plan_slide(s: _Slide, tissue, opts: RegionsOptions, stats: Counter) -> list[Piece]:
    """Every image of one slide: its regions' pieces (label rule), then the background rule."""
    import shapely

    ds = (opts.mpp / s.mpp[0], opts.mpp / s.mpp[1])
    if s.normal:
        return _normal_slide_tiles(s, ds, tissue, opts)
    tumours = [r.geom for r in s.regions if r.label == 1]
    tumour = shapely.unary_union(tumours) if tumours else None
    kept = []
    for r in s.regions:
        before = len(kept)
        for p in plan_region(r, ds, opts, tumour, stats):
            p.background = round(1.0 - tissue.fraction(*p.box), 4)
            if p.background > opts.max_background:
                stats["background"] += 1
                continue
            kept.append(p)
        if len(kept) == before:
            stats["regions_without_images"] += 1
    return kept


def _write_slide(s: _Slide, opts: RegionsOptions, out: Path, stats: Counter) -> list[dict]:
    with open_slide(s.path, mpp=opts.slide_mpp) as slide:
        tissue, _ = slide_tissue(slide, opts.tissue)
        pieces = _plan_slide(s, tissue, opts, stats)
        records = []
        for p in pieces:
            cls = "pos" if p.label else "neg"
            image_rel = f"{s.split}/{cls}/{p.stem}.{opts.image_format}"
            (out / s.split / cls).mkdir(parents=True, exist_ok=True)
            save_patch_image(out / image_rel, read_scaled(slide, p.box, p.size), opts.image_format)
            records.append({"image": image_rel, "label": p.label, "mask": "", "split": s.split, "slide": s.key,
                            "box": [round(v, 2) for v in p.box], "size": list(p.size), "mpp": opts.mpp,
                            "background": p.background, "tumour_fraction": p.inside if p.label else 0.0})
    return records


def _collect(slides_dir: Path, labels: Path, opts: RegionsOptions) -> tuple[list[_Slide], dict]:
    """Read and check every label and slide before any image is written (each problem: one error)."""
    fmt, raw, skipped = read_labels(labels)
    classes = opts.class_map()
    regions = apply_classes(raw, classes, labels)
    files = find_slides(slides_dir)
    named = {r.slide: r.file for r in reversed(regions)}
    normal = read_normal_slides(Path(opts.normal_slides)) if opts.normal_slides else []
    _check_named(named, files, slides_dir)
    _check_named({k: opts.normal_slides for k in normal}, files, slides_dir)
    by_slide: dict[str, list[Region]] = {}
    for r in regions:
        by_slide.setdefault(r.slide, []).append(r)
    slides = [_Slide(k, files[k], by_slide.get(k, []), k in normal)
              for k in sorted(set(by_slide) | set(normal), key=natural_key)]
    for s in slides:
        _inspect(s, opts)
    info = {"label_format": fmt, "skipped_objects": dict(skipped), "regions_skipped_by_class": len(raw) - len(regions)}
    return slides, info


def _warn(stats: Counter, records: list[dict], opts: RegionsOptions) -> None:
    """What the label rule did, and splits that training cannot use, said once."""
    for split, c in counts(records).items():
        if split != "test" and (c["pos"] == 0 or c["neg"] == 0):
            log.warning("the %s split has %d tumour and %d normal image(s); training needs both in train (and "
                        "validation scores better with both): label more slides or change --seed", split,
                        c["pos"], c["neg"])
    if stats["tumour_regions_tiled"]:
        log.warning("%d Tumor region(s) longer than --max-size %d px were tiled: %d tile(s) labelled tumour "
                    "(at least %g inside the outline), %d dropped below that; a tile of a loosely drawn tumour "
                    "region may hold no tumour: draw tumour regions tightly, or raise --max-size",
                    stats["tumour_regions_tiled"], opts.max_size, stats["tumour_tiles_positive"],
                    opts.min_tumour_overlap, stats["tumour_tiles_below_overlap"])
    if stats["normal_tiles_touching_tumour"]:
        log.warning("%d Normal tile(s) overlapping a Tumor region were dropped (the labels contradict there)",
                    stats["normal_tiles_touching_tumour"])
    dropped = {k: stats[k] for k in ("background", "too_small", "normal_tiles_outside_outline") if stats[k]}
    if dropped:
        text = ", ".join(f"{v} ({k.replace('_', ' ')})" for k, v in dropped.items())
        if stats["regions_without_images"]:
            log.warning("%d region(s) gave no image at all; images dropped: %s (see --min-size, --max-background, "
                        "--normal-min-inside)", stats["regions_without_images"], text)
        else:
            log.info("regions: images dropped: %s", text)


def _summary(slides: list[_Slide], records: list[dict], stats: Counter, opts: RegionsOptions, slides_dir: Path,
             labels: Path, info: dict) -> dict:
    per_slide = Counter(r["slide"] for r in records)
    return {
        "source": {"slides": str(slides_dir), "labels": str(labels), "normal_slides": opts.normal_slides, **info},
        "mpp": opts.mpp,
        "slide_mpp": {s.key: [round(v, 5) for v in s.mpp] for s in slides},
        "slide_mpp_source": {s.key: s.mpp_source for s in slides},
        "slides": {split: [s.key for s in slides if s.split == split] for split in ("train", "val", "test")},
        "tumour_slides": [s.key for s in slides if s.tumour],
        "normal_slides": [s.key for s in slides if s.normal],
        "regions_per_slide": {s.key: dict(Counter(r.name for r in s.regions)) for s in slides if s.regions},
        "images_per_slide": {s.key: per_slide[s.key] for s in slides},
        "tiling": {k: stats[k] for k in sorted(stats)},
        "tumour_fraction_note": "tumour_fraction of a positive is the share of the image inside its drawn "
                                "Tumor region, not a measured tumour area",
        "protocol": (f"images at {opts.mpp} µm/px; Tumor regions up to {opts.max_size} px whole, larger ones in "
                     f"{opts.patch_size} px tiles positive when >= {opts.min_tumour_overlap} inside; Normal regions "
                     f"in {opts.patch_size} px tiles >= {opts.normal_min_inside} inside and off Tumor regions; drop "
                     f"background > {opts.max_background}; split by slide (val {opts.val_fraction}, test "
                     f"{opts.test_fraction}, seed {opts.seed})"),
    }


def _labels_digest(slides: list[_Slide]) -> str:
    h = hashlib.sha256()
    for s in slides:
        h.update(f"{s.key}|{s.normal}|{s.path}\n".encode())
        for r in s.regions:
            h.update(f"{r.number}|{r.label}|".encode() + r.geom.wkb)
    return h.hexdigest()[:16]


def prepare_regions(slides_dir: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike,
                    options: RegionsOptions | None = None, progress: bool = True) -> Path:
    """Build a dataset from regions drawn on slides (see the module docstring); resumable slide by slide.

    Args:
        slides_dir: a folder of slides (any format `open_slide` reads, any depth) or one slide.
        labels: QuPath GeoJSON exports (a file per slide, or a folder of them) or a CSV slide,x,y,w,h,label.
        out: output folder (the ikdmil layout plus ``manifest.csv`` with mpp and ``regions_summary.json``).
        options: resolution, tiling and label rule, classes, splits (`RegionsOptions`).
        progress: show a progress bar.

    Returns:
        The path of ``OUT/manifest.csv``.

    Example:
        >>> prepare_regions("slides", "qupath_exports", "data/regions", RegionsOptions(classes="Stroma=0"))
    """
    opts = (options or RegionsOptions()).validate()
    slides_dir, labels = Path(slides_dir).absolute(), Path(labels).absolute()
    slides, info = _collect(slides_dir, labels, opts)
    splits = split_by_class([(s.key, s.tumour) for s in slides], opts.val_fraction, opts.test_fraction, opts.seed)
    for s in slides:
        s.split = splits[s.key]
    # the labels are part of the settings: a rerun after editing them is refused instead of mixing old images in
    settings = {**dataclasses.asdict(opts), "classes": dict(sorted(opts.class_map().items())),
                "labels_digest": _labels_digest(slides)}
    sources = [p for p in (slides_dir, labels) if p.is_dir()]
    store = ResumableOutput(out, PREPARER_ID, settings, sources, SUMMARY_NAME)
    records, stats = [], Counter()
    for s in tqdm(slides, desc="regions", unit="slide", disable=not progress):
        done, counted = store.done(s.key), store.load("stats", s.key)
        if done is None or counted is None:
            counted = Counter()
            done = _write_slide(s, opts, store.out, counted)
            store.save("stats", s.key, counted)
            store.mark_done(s.key, done)
        stats.update(counted)
        records.extend(done)
    _warn(stats, records, opts)
    manifest = store.finish(records, _summary(slides, records, stats, opts, slides_dir, labels, info))
    log.info("regions: %s", format_counts(records))
    return manifest
