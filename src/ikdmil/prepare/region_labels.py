"""Reading the labels of `ikdmil prepare regions`: QuPath GeoJSON exports, region CSVs, class names, and
the --normal-slides list. Every problem is one `IkdmilError` naming the file (and row or feature) and the
fix; see `ikdmil.prepare.regions` for what the labels mean and how they become images.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ikdmil.errors import IkdmilError
from ikdmil.prepare.common import natural_key
from ikdmil.slide.reader import INPUT_SUFFIXES

SKIP = "skip"
UNCLASSIFIED = "Unclassified"
DEFAULT_CLASSES = {"tumor": 1, "tumour": 1, "1": 1, "normal": 0, "0": 0, "ignore*": SKIP, "region*": SKIP}
GEOJSON_SUFFIXES = (".geojson", ".json")
CSV_COLUMNS = ("slide", "x", "y", "w", "h", "label")
_NOT_REGIONS = {"detection", "cell", "tile"}  # QuPath object types that are not drawn regions


def parse_classes(text: str) -> dict[str, int | str]:
    """DEFAULT_CLASSES updated by "Name=1,Other=0,Ignore=skip" (names matched in any case)."""
    mapping: dict[str, int | str] = dict(DEFAULT_CLASSES)
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        value = value.strip().lower()
        if not sep or not name.strip() or value not in ("1", "0", SKIP):
            raise ValueError(f"{part.strip()!r} is not NAME=1, NAME=0 or NAME=skip; write e.g. "
                             "--classes \"Tumor=1,Normal=0,Ignore=skip\"")
        mapping[name.strip().lower()] = SKIP if value == SKIP else int(value)
    return mapping


def classes_problem(text: str) -> str | None:
    """What is wrong with a --classes text, or None (the option's check, run when it is parsed)."""
    try:
        parse_classes(text)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass
class Region:
    """One drawn region: its slide (key), its number there (1-based, file order), class and level-0 outline."""

    slide: str
    number: int
    name: str
    geom: object
    file: Path  # the label file it comes from
    where: str  # "FILE feature 3" / "FILE:5", for messages
    label: int | None = None



def slide_key(name: str) -> str:
    """The name a slide is matched by: file name without label and slide suffixes, lower case."""
    stem = Path(name.strip()).name
    for suffixes in (GEOJSON_SUFFIXES, INPUT_SUFFIXES):
        for suf in suffixes:
            if stem.lower().endswith(suf) and len(stem) > len(suf):
                stem = stem[: -len(suf)]
                break
    return stem.lower()


def _class_name(props: dict) -> str:
    c = props.get("classification")
    if isinstance(c, dict):
        name = c.get("name") or (": ".join(map(str, c["names"])) if isinstance(c.get("names"), list) else None)
    else:
        name = c if isinstance(c, str) else None
    return str(name).strip() if name and str(name).strip() else UNCLASSIFIED


def read_qupath_geojson(path: Path, skipped: Counter) -> list[Region]:
    """The area annotations of one QuPath export; detections, points and lines counted in `skipped`."""
    import shapely

    from ikdmil.slide.geojson import _polygons_only, load_features, to_shape

    key, regions = slide_key(path.name), []
    for i, (props, geom) in enumerate(load_features(path), 1):
        if str(props.get("objectType", "annotation")).lower() in _NOT_REGIONS:
            skipped["detections"] += 1
            continue
        if geom is None or "type" not in geom:
            raise IkdmilError(f"{path}: feature {i} has no geometry; fix or re-export the file from QuPath")
        if geom["type"] not in ("Polygon", "MultiPolygon"):
            skipped["points_or_lines"] += 1
            continue
        polys = _polygons_only(to_shape(path, geom, f"feature {i}"))  # make_valid may add lines or points
        shape = shapely.unary_union(polys) if polys else None
        if shape is None or shape.area <= 0:
            skipped["empty_areas"] += 1
            continue
        regions.append(Region(key, len(regions) + 1, _class_name(props), shape, path, f"{path} feature {i}"))
    return regions


def _csv_float(path: Path, line: int, col: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise IkdmilError(f"{path}:{line}: {col} must be a number of level-0 pixels, got {text!r}; fix the row")
    return value


def read_region_csv(path: Path) -> list[Region]:
    """Boxes of a ``slide,x,y,w,h,label`` CSV (level-0 px; label a class name or 1 / 0)."""
    from shapely.geometry import box

    regions, per_slide = [], Counter()
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [c.strip().lower() for c in next(reader, [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise IkdmilError(f"{path}: lacks column(s) {', '.join(missing)}; its first line must be the header "
                                  f"{','.join(CSV_COLUMNS)}")
            for cells in reader:
                if not any(c.strip() for c in cells):
                    continue
                line, row = reader.line_num, dict(zip(header, (c.strip() for c in cells)))
                if not row.get("slide") or not row.get("label"):
                    raise IkdmilError(f"{path}:{line}: empty slide or label; fill both columns")
                x, y, w, h = (_csv_float(path, line, c, row.get(c, "")) for c in ("x", "y", "w", "h"))
                if w <= 0 or h <= 0:
                    raise IkdmilError(f"{path}:{line}: w and h must be positive (got {w:g} x {h:g}); fix the row")
                key = slide_key(row["slide"])
                per_slide[key] += 1
                regions.append(Region(key, per_slide[key], row["label"], box(x, y, x + w, y + h), path,
                                      f"{path}:{line}"))
    except UnicodeDecodeError as exc:
        raise IkdmilError(f"{path}: not a text CSV file ({exc.reason}); save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise IkdmilError(f"{path}: malformed CSV ({' '.join(str(exc).split())}); fix the file") from None
    except OSError as exc:
        raise IkdmilError(f"{path}: cannot read ({' '.join(str(exc).split())}); check the file") from None
    return regions


def read_labels(labels: Path) -> tuple[str, list[Region], Counter]:
    """(format, regions, skipped counts) of LABELS: a CSV, a GeoJSON file or a folder of GeoJSON files."""
    skipped: Counter = Counter()
    if labels.is_dir():
        files = sorted((p for p in labels.rglob("*") if p.is_file() and not p.name.startswith(".")
                        and p.suffix.lower() in GEOJSON_SUFFIXES), key=lambda p: natural_key(p.name))
        if not files:
            raise IkdmilError(f"{labels}: no .geojson files; export each slide's annotations from QuPath "
                              "(File > Export objects as GeoJSON) into this folder")
        seen: dict[str, Path] = {}
        for p in files:
            key = slide_key(p.name)
            if key in seen:
                raise IkdmilError(f"{p}: a second label file for slide {key} ({seen[key].name}); keep one")
            seen[key] = p
        return "geojson", [r for p in files for r in read_qupath_geojson(p, skipped)], skipped
    if not labels.is_file():
        raise IkdmilError(f"{labels}: labels not found; give QuPath GeoJSON exports (a file or a folder) or a "
                          f"CSV with the header {','.join(CSV_COLUMNS)}")
    if labels.suffix.lower() == ".csv":
        return "csv", read_region_csv(labels), skipped
    if labels.suffix.lower() in GEOJSON_SUFFIXES:
        return "geojson", read_qupath_geojson(labels, skipped), skipped
    raise IkdmilError(f"{labels}: labels must be .geojson / .json (QuPath exports) or .csv "
                      f"({','.join(CSV_COLUMNS)})")


def apply_classes(regions: list[Region], classes: dict[str, int | str], labels: Path) -> list[Region]:
    """Regions with their label; skipped classes left out; every unknown class name in one error."""
    unknown: dict[str, list[str]] = {}
    kept = []
    for r in regions:
        value = classes.get(r.name.lower())
        if value is None:
            unknown.setdefault(r.name, []).append(r.file)
        elif value != SKIP:
            r.label = int(value)
            kept.append(r)
    if unknown:
        files = {f for fs in unknown.values() for f in fs}
        where = next(iter(files)) if len(files) == 1 else labels
        names = "; ".join(f"{n!r} ({len(ws)} region(s))" for n, ws in sorted(unknown.items()))
        example = ",".join(f"{n}=0" for n in sorted(unknown))
        raise IkdmilError(f"{where}: unknown class name(s) {names}; map each to 1 (contains tumour), 0 (no tumour) "
                          f"or skip with --classes, e.g. --classes \"{example}\"")
    if not kept:
        raise IkdmilError(f"{labels}: no Tumor or Normal regions (after --classes); draw area annotations and "
                          "classify them")
    return kept


def read_normal_slides(path: Path) -> list[str]:
    """Slide keys of a --normal-slides file: one name per line, or a CSV whose header has a slide column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [[c.strip() for c in row] for row in csv.reader(fh) if any(c.strip() for c in row)]
    except FileNotFoundError:
        raise IkdmilError(f"{path}: --normal-slides file not found; check the path") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IkdmilError(f"{path}: cannot read the --normal-slides file ({' '.join(str(exc).split())}); give a "
                          "text file with one slide name per line") from None
    column = 0
    if rows and "slide" in [c.lower() for c in rows[0]]:
        column = [c.lower() for c in rows[0]].index("slide")
        rows = rows[1:]
    names = [slide_key(r[column]) for r in rows if len(r) > column and r[column]]
    if not names:
        raise IkdmilError(f"{path}: no slide names; write one slide name per line")
    return list(dict.fromkeys(names))
