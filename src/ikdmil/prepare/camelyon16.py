"""Prepare Camelyon16 (lymph-node sections with breast-cancer metastases) as a patch dataset.

Source: SLIDES_DIR holds the slides (any depth: ``training/tumor/tumor_001.tif``,
``training/normal/normal_001.tif``, ``testing/images/test_001.tif``); ANNOTATIONS_DIR holds ASAP XML
files named after the slides (``tumor_001.xml``, ``test_001.xml``). Polygons in the groups given by
`exclusion_groups` (Camelyon16: ``_2``; also "Exclusion") are holes cut out of the tumour of the
other groups (``_0``, ``_1``, "Tumor", ...). Points and dots are ignored.

Protocol (the IKD-MIL paper's, every number an option):

- patches of `patch_size` (1280) px at pyramid `level` 1 (20x; or at `mpp` µm/px, read from the
  nearest finer level and downsampled), on a non-overlapping grid from the slide origin;
- background = 1 - tissue fraction of the patch (tissue: saturation/Otsu on an overview, see
  `ikdmil.slide.tissue`); patches with more than `max_background` (0.8) background are dropped, except
  that test-split positives use `test_max_background` (0.9, the paper's test rule);
- positives: patches of tumour slides whose tumour fraction (annotation area inside the patch) is above
  `min_tumour_fraction` (0 = any tumour); their masks are saved for evaluation. Patches of tumour
  slides without tumour are not used;
- negatives: from normal slides, `neg_ratio` (1) times as many as the positives of the same split,
  drawn deterministically (seed) round-robin over the split's normal slides;
- splits: ``tumor_*`` / ``normal_*`` are the official training slides, ``test_*`` the test slides. A test
  slide is tumour or normal by the reference CSV (``Test_001,Tumor,...``; `reference`, or a
  ``reference.csv`` found under the two folders), or, without one, by whether it has an annotation.
  Validation is carved out of training **by slide**: `val_fraction` of the tumour slides and of the
  normal slides, chosen by `seed`; the test split is never looked at for it.

Output: ``OUT/{train,val,test}/{pos,neg}/SLIDE_xX_yY.png`` (X, Y: level-0 pixel of the patch's
top-left corner), ``OUT/{split}/masks/...png`` for positives, ``OUT/manifest.csv`` and
``OUT/camelyon16_summary.json``. Resumable (see `ikdmil.prepare.common`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import os
import random
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ikdmil.errors import IkdmilError
from ikdmil.io import write_png
from ikdmil.prepare.common import ResumableOutput, files_by_stem, format_counts, natural_key, save_patch_image
from ikdmil.slide.reader import open_slide, read_scaled
from ikdmil.slide.tissue import TissueParams, slide_tissue

log = logging.getLogger(__name__)

PREPARER_ID = "ikdmil.prepare.camelyon16"
SUMMARY_NAME = "camelyon16_summary.json"
_NAME = re.compile(r"^(tumor|normal|test)_(\d+)$", re.IGNORECASE)
_SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs")
_POLYGON_TYPES = {"polygon", "spline", "rectangle", "polyline"}


@dataclass
class Camelyon16Options:
    patch_size: int = 1280
    level: int | None = 1
    mpp: float | None = None  # if given, patches at this µm/px instead of `level`
    max_background: float = 0.8
    test_max_background: float = 0.9
    min_tumour_fraction: float = 0.0
    neg_ratio: float = 1.0
    max_pos_per_slide: int = 0  # 0 = all
    val_fraction: float = 0.2
    seed: int = 0
    image_format: str = "png"
    exclude: tuple[str, ...] = ()
    exclusion_groups: tuple[str, ...] = ("_2", "Exclusion")
    reference: str | None = None
    tissue: TissueParams = field(default_factory=TissueParams)

    def validate(self) -> Camelyon16Options:
        checks = [
            (self.patch_size >= 16, "--patch-size must be at least 16"),
            (self.mpp is None or self.mpp > 0, "--mpp must be positive"),
            (self.level is None or self.level >= 0, "--level must be >= 0"),
            (0 <= self.max_background <= 1 and 0 <= self.test_max_background <= 1,
             "--max-background and --test-max-background must be in [0, 1]"),
            (0 <= self.min_tumour_fraction < 1, "--min-tumour-fraction must be in [0, 1)"),
            (self.neg_ratio >= 0, "--neg-ratio must be >= 0"),
            (self.max_pos_per_slide >= 0, "--max-per-slide must be >= 0"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (self.image_format in ("png", "jpg"), "--image-format must be png or jpg"),
        ]
        for ok, msg in checks:
            if not ok:
                raise IkdmilError(msg)
        return self

    def settings(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = sorted(n.lower() for n in self.exclude)
        d["exclusion_groups"] = sorted(g.lower() for g in self.exclusion_groups)
        return d


# ----------------------------------------------------------------------------------------- annotations


def read_asap_xml(path: str | os.PathLike, exclusion_groups=("_2", "Exclusion")):
    """(tumour geometry, number of tumour polygons, number of exclusion polygons) in level-0 pixels."""
    import shapely
    from shapely.geometry import Polygon

    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise IkdmilError(f"{path}: not a readable ASAP XML file ({' '.join(str(exc).split())}); "
                          "fix or re-export it") from None
    excl = {g.lower() for g in exclusion_groups}
    tumour, exclusion = [], []
    for ann in root.iter("Annotation"):
        kind = (ann.get("Type") or "Polygon").lower()
        if kind not in _POLYGON_TYPES:
            continue
        coords = []
        for c in ann.iter("Coordinate"):
            try:
                order = int(float(c.get("Order", len(coords))))
                x = float((c.get("X") or "").replace(",", "."))
                y = float((c.get("Y") or "").replace(",", "."))
            except ValueError:
                raise IkdmilError(
                    f"{path}: annotation {ann.get('Name')!r} has a coordinate that is not a number; fix the file"
                ) from None
            coords.append((order, x, y))
        coords.sort()
        pts = [(x, y) for _, x, y in coords]
        if len(pts) < 3:
            continue
        geom = shapely.make_valid(Polygon(pts))
        group = (ann.get("PartOfGroup") or "").lower()
        (exclusion if group in excl else tumour).append(geom)
    if not tumour:
        return None, 0, len(exclusion)
    geom = shapely.unary_union(tumour)
    if exclusion:
        geom = geom.difference(shapely.unary_union(exclusion))
    return shapely.make_valid(geom), len(tumour), len(exclusion)


# ---------------------------------------------------------------------------------------------- sources


@dataclass
class _Slide:
    name: str  # lower case: tumor_001
    path: Path
    kind: str  # tumor | normal | test
    tumour: bool
    annotation: Path | None
    split: str = ""


def _read_reference(path: Path) -> dict[str, bool]:
    out = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            for line, row in enumerate(csv.reader(fh), 1):
                if not row or not row[0].strip():
                    continue
                name = Path(row[0].strip()).stem.lower()
                if line == 1 and not _NAME.match(name):
                    continue  # a header
                label = (row[1].strip().lower() if len(row) > 1 else "")
                if label not in ("tumor", "tumour", "normal"):
                    raise IkdmilError(f"{path}:{line}: label {label!r} for {row[0]}; it must be Tumor or Normal")
                out[name] = label != "normal"
    except (OSError, UnicodeDecodeError) as exc:
        raise IkdmilError(f"{path}: cannot read the reference CSV ({exc}); "
                          "give a CSV of name,Tumor|Normal rows") from None
    return out


def _collect(slides_dir: Path, annos_dir: Path, opts: Camelyon16Options) -> tuple[list[_Slide], dict]:
    for folder, what in ((slides_dir, "slides"), (annos_dir, "annotations")):
        if not folder.is_dir():
            raise IkdmilError(f"{folder}: {what} folder not found; check the path")
    files = files_by_stem(slides_dir, _SLIDE_SUFFIXES)
    annos = files_by_stem(annos_dir, (".xml",))
    excluded = {n.lower() for n in opts.exclude}
    ref_path = Path(opts.reference) if opts.reference else None
    if ref_path is None:
        cands = sorted({p.resolve() for d in (slides_dir, annos_dir) for p in d.rglob("*")
                        if p.is_file() and p.name.lower() == "reference.csv"})
        if len(cands) > 1:
            raise IkdmilError(f"{cands[0]}: several reference.csv files found ({len(cands)}); "
                              "pick one with --reference")
        ref_path = cands[0] if cands else None
    elif not ref_path.is_file():
        raise IkdmilError(f"{ref_path}: reference CSV not found; check --reference")
    reference = _read_reference(ref_path) if ref_path else None
    slides, ignored = [], []
    for key, path in files.items():
        m = _NAME.match(key)
        if not m:
            ignored.append(path.name)
            continue
        if key in excluded:
            continue
        kind = m.group(1).lower()
        anno = annos.get(key)
        if kind == "tumor":
            if anno is None:
                raise IkdmilError(
                    f"{path}: tumour slide without annotation {key}.xml in {annos_dir}; add it or --exclude {key}"
                )
            tumour = True
        elif kind == "normal":
            tumour, anno = False, None
        else:
            if reference is not None:
                if key not in reference:
                    raise IkdmilError(f"{ref_path}: has no row for {key}; add it or --exclude {key}")
                tumour = reference[key]
                if tumour and anno is None:
                    raise IkdmilError(
                        f"{path}: test slide is Tumor in {ref_path.name} but has no annotation {key}.xml in "
                        f"{annos_dir}; add it or --exclude {key}"
                    )
                if not tumour:
                    anno = None
            else:
                tumour = anno is not None
        slides.append(_Slide(key, path, kind, tumour, anno))
    if not slides:
        raise IkdmilError(
            f"{slides_dir}: no Camelyon16 slides (tumor_NNN.tif, normal_NNN.tif, test_NNN.tif) found; check the path"
        )
    missing = [k for k in excluded if k not in files]
    info = {"reference": str(ref_path) if ref_path else None, "ignored_files": ignored,
            "excluded": sorted(excluded), "excluded_not_found": sorted(missing)}
    return slides, info


def _assign_splits(slides: list[_Slide], val_fraction: float, seed: int) -> None:
    rng = random.Random(seed)
    for kind in ("tumor", "normal"):
        group = sorted((s for s in slides if s.kind == kind), key=lambda s: natural_key(s.name))
        n_val = int(round(val_fraction * len(group)))
        if val_fraction > 0 and len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        order = group[:]
        rng.shuffle(order)
        val = {s.name for s in order[:n_val]}
        for s in group:
            s.split = "val" if s.name in val else "train"
    for s in slides:
        if s.kind == "test":
            s.split = "test"


# ------------------------------------------------------------------------------------------------ scan


def _seed_for(seed: int, name: str) -> int:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:12], 16)


def _scan(s: _Slide, opts: Camelyon16Options) -> dict:
    """Candidate patches of one slide: level-0 (x, y), background and tumour fraction."""
    from shapely.geometry import box as sbox
    from shapely.prepared import prep

    slide = open_slide(s.path)
    try:
        if slide.mpp is None:
            raise IkdmilError(
                f"{s.path}: no resolution (µm/px) in the slide's metadata (Camelyon16 slides carry it); "
                "the file may be damaged: copy it again"
            )
        if opts.mpp is not None:
            ds = opts.mpp / slide.mpp[0]
        else:
            if opts.level >= slide.level_count:
                raise IkdmilError(
                    f"{s.path}: has {slide.level_count} levels, no level {opts.level}; use a lower --level or --mpp"
                )
            ds = slide.level_downsamples[opts.level]
        tissue, _ = slide_tissue(slide, opts.tissue)
        W, H = slide.dimensions
        span = opts.patch_size * ds
        geom = None
        if s.annotation is not None:
            geom, n_t, n_x = read_asap_xml(s.annotation, opts.exclusion_groups)
            if geom is None and s.tumour:
                raise IkdmilError(
                    f"{s.annotation}: no tumour polygons (only groups {', '.join(opts.exclusion_groups)} or points); "
                    f"fix the file or --exclude {s.name}"
                )
        pgeom = prep(geom) if geom is not None and not geom.is_empty else None
        cands = []
        for j in range(int(H // span)):
            for i in range(int(W // span)):
                x, y = i * span, j * span
                bg = 1.0 - tissue.fraction(x, y, span, span)
                tf = 0.0
                if pgeom is not None:
                    b = sbox(x, y, x + span, y + span)
                    if pgeom.intersects(b):
                        tf = geom.intersection(b).area / b.area
                cands.append([round(x, 3), round(y, 3), round(bg, 4), round(tf, 4)])
        return {"downsample": ds, "span": span, "mpp": list(slide.mpp), "dimensions": [W, H],
                "tissue_threshold": tissue.threshold, "candidates": cands}
    finally:
        slide.close()


# -------------------------------------------------------------------------------------------- choosing


def _choose(slides: list[_Slide], scans: dict[str, dict], opts: Camelyon16Options) -> dict[str, list]:
    """slide name -> chosen [x, y, label, background, tumour_fraction]."""
    chosen: dict[str, list] = {s.name: [] for s in slides}
    n_pos: dict[str, int] = {"train": 0, "val": 0, "test": 0}
    for s in sorted(slides, key=lambda s: natural_key(s.name)):
        if not s.tumour:
            continue
        limit = opts.test_max_background if s.split == "test" else opts.max_background
        pos = [c for c in scans[s.name]["candidates"] if c[3] > opts.min_tumour_fraction and c[2] <= limit]
        if opts.max_pos_per_slide and len(pos) > opts.max_pos_per_slide:
            rng = random.Random(_seed_for(opts.seed, s.name))
            pos = sorted(rng.sample(pos, opts.max_pos_per_slide), key=lambda c: (c[1], c[0]))
        chosen[s.name] = [[c[0], c[1], 1, c[2], c[3]] for c in pos]
        n_pos[s.split] += len(pos)
    for split in ("train", "val", "test"):
        normals = sorted((s for s in slides if s.split == split and not s.tumour), key=lambda s: natural_key(s.name))
        want = int(round(opts.neg_ratio * n_pos[split]))
        pools = []
        for s in normals:
            pool = [c for c in scans[s.name]["candidates"] if c[2] <= opts.max_background]
            random.Random(_seed_for(opts.seed, s.name)).shuffle(pool)
            pools.append((s.name, pool))
        taken = 0
        depth = 0
        while taken < want and any(depth < len(p) for _, p in pools):
            for name, pool in pools:
                if taken >= want:
                    break
                if depth < len(pool):
                    c = pool[depth]
                    chosen[name].append([c[0], c[1], 0, c[2], c[3]])
                    taken += 1
            depth += 1
    for name in chosen:
        chosen[name].sort(key=lambda c: (c[1], c[0]))
    return chosen


# ------------------------------------------------------------------------------------------- extraction


def patch_resolution(scan: dict) -> float:
    """µm/px of a slide's patches: the slide's level-0 µm/px times the read downsample (level or --mpp)."""
    return round(scan["mpp"][0] * scan["downsample"], 4)


def _extract(s: _Slide, scan: dict, patches: list, opts: Camelyon16Options, out: Path, bar) -> list[dict]:
    from ikdmil.slide.tissue import draw_polygons

    geom = None
    if s.annotation is not None and any(p[2] == 1 for p in patches):
        geom, _, _ = read_asap_xml(s.annotation, opts.exclusion_groups)
    slide = open_slide(s.path)
    span, P = scan["span"], opts.patch_size
    ext = opts.image_format
    patch_mpp = patch_resolution(scan)

    def one(p):
        x, y, label, bg, tf = p
        stem = f"{s.name}_x{int(round(x))}_y{int(round(y))}"
        cls = "pos" if label else "neg"
        rgb = read_scaled(slide, (x, y, span, span), (P, P))
        image_rel = f"{s.split}/{cls}/{stem}.{ext}"
        save_patch_image(out / image_rel, rgb, ext)
        mask_rel = ""
        if label:
            from shapely.geometry import box as sbox

            mask = np.zeros((P, P), bool)
            part = geom.intersection(sbox(x, y, x + span, y + span)) if geom is not None else None
            if part is not None and not part.is_empty:
                draw_polygons(mask, [part], 1.0 / scan["downsample"], offset=(x, y), fill=True)
            mask_rel = f"{s.split}/masks/{stem}.png"
            write_png(out / mask_rel, mask)
            tf = float(mask.mean())
        bar.update(1)
        return {"image": image_rel, "label": int(label), "mask": mask_rel, "split": s.split, "mpp": patch_mpp,
                "slide": s.name, "x": x, "y": y, "background": bg, "tumour_fraction": round(tf, 4)}

    try:
        workers = min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:  # OpenSlide reads are thread-safe
            return list(pool.map(one, patches))
    finally:
        slide.close()


def _scan_all(slides: list, opts: Camelyon16Options, store: ResumableOutput, progress: bool) -> dict:
    """Tissue and tumour scan of every slide (resumable: a slide scanned before is not scanned again)."""
    scans = {}
    for s in tqdm(slides, desc="scanning slides", unit="slide", disable=not progress, leave=False):
        scan = store.load("scan", s.name)
        if scan is None:
            scan = _scan(s, opts)
            store.save("scan", s.name, scan)
        scans[s.name] = scan
    return scans


def _write_all(slides: list, scans: dict, chosen: dict, opts: Camelyon16Options, store: ResumableOutput,
               progress: bool) -> list[dict]:
    """Write the chosen patches slide by slide (a finished slide is skipped on resume); their records."""
    total = sum(len(v) for v in chosen.values())
    records: list[dict] = []
    with tqdm(total=total, desc="writing patches", unit="patch", disable=not progress) as bar:
        for s in slides:
            patches = chosen[s.name]
            done = store.done(s.name)
            if done is not None and len(done) == len(patches):
                bar.update(len(done))
                records.extend(done)
                continue
            for sub in ("pos", "neg", "masks"):
                (store.out / s.split / sub).mkdir(parents=True, exist_ok=True)
            recs = _extract(s, scans[s.name], patches, opts, store.out, bar)
            store.mark_done(s.name, recs)
            records.extend(recs)
    return records


def _summary(slides: list, scans: dict, chosen: dict, opts: Camelyon16Options, slides_dir: Path, annos_dir: Path,
             info: dict) -> dict:
    """camelyon16_summary.json: the slides of each split, patches per slide, their µm/px, the protocol."""
    slide_table = {
        split: sorted((s.name for s in slides if s.split == split), key=natural_key)
        for split in ("train", "val", "test")
    }
    candidates = {s.name: len(scans[s.name]["candidates"]) for s in slides}
    summary = {
        "source": {"slides": str(slides_dir), "annotations": str(annos_dir), **info},
        "slides": slide_table,
        "tumour_slides": sorted((s.name for s in slides if s.tumour), key=natural_key),
        "patches_per_slide": {s.name: len(chosen[s.name]) for s in slides},
        "grid_patches_per_slide": candidates,
        "patch_level0_size": {s.name: scans[s.name]["span"] for s in slides},
        # µm/px of the patches (slide mpp x downsample): what a model trained on them should store as "mpp"
        "patch_mpp": {s.name: patch_resolution(scans[s.name]) for s in slides},
        "protocol": (
            f"{opts.patch_size} px patches at "
            + (f"{opts.mpp} µm/px" if opts.mpp is not None else f"level {opts.level}")
            + f"; drop background > {opts.max_background} (test positives: > {opts.test_max_background}); "
            "positives = tumour patches of tumour slides (masks saved); negatives from normal slides, "
            f"{opts.neg_ratio}x the positives per split; val by slide from train (seed {opts.seed})"
        ),
    }
    return summary


def prepare_camelyon16(slides_dir: str | os.PathLike, annotations_dir: str | os.PathLike, out: str | os.PathLike,
                       options: Camelyon16Options | None = None, progress: bool = True) -> Path:
    """Build the Camelyon16 patch dataset (see the module docstring); resumable slide by slide.

    Args:
        slides_dir: folder of ``*.tif`` slides (``normal_*``, ``tumor_*``, ``test_*``).
        annotations_dir: folder of ASAP XML files (``tumor_001.xml``, ...), the source of patch labels.
        out: output folder (the ikdmil layout plus ``manifest.csv`` and a summary JSON).
        options: patch size, level or µm/px, counts, tissue detection (`Camelyon16Options`).
        progress: show progress bars.

    Returns:
        The path of ``OUT/manifest.csv``.

    Example:
        >>> prepare_camelyon16("c16/images", "c16/annotations", "data/c16")
    """
    opts = (options or Camelyon16Options()).validate()
    if opts.mpp is not None:
        opts = dataclasses.replace(opts, level=None)
    slides_dir, annos_dir = Path(slides_dir).absolute(), Path(annotations_dir).absolute()
    slides, info = _collect(slides_dir, annos_dir, opts)
    _assign_splits(slides, opts.val_fraction, opts.seed)
    store = ResumableOutput(out, PREPARER_ID, opts.settings(), [slides_dir, annos_dir], SUMMARY_NAME)

    scans = _scan_all(slides, opts, store, progress)
    chosen = _choose(slides, scans, opts)
    records = _write_all(slides, scans, chosen, opts, store, progress)
    summary = _summary(slides, scans, chosen, opts, slides_dir, annos_dir, info)
    manifest = store.finish(records, summary)
    log.info("camelyon16: %s", format_counts(records))
    return manifest
