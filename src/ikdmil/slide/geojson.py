"""Binary masks to QuPath-importable GeoJSON polygons, and GeoJSON polygons back in.

`mask_polygons` traces a (possibly memory-mapped, arbitrarily large) boolean mask block by block
with marching squares, so memory stays O(block²) plus the polygons themselves; pieces that touch a
block edge are merged with `shapely.unary_union`, so a region spanning several blocks comes out as
one polygon. Coordinates use the pixel-edge convention: pixel (row i, col j) is the square
``[j, j+1] x [i, i+1]``. Holes are kept; holes and polygons smaller than a minimum area are dropped.

`feature_collection` scales polygons to level-0 slide pixels and writes what QuPath expects::

    {"type": "FeatureCollection", "features": [{"type": "Feature", "id": "<uuid>",
      "geometry": {"type": "Polygon", "coordinates": [...]},
      "properties": {"objectType": "annotation", "name": "Tumor",
                     "classification": {"name": "Tumor", "color": [200, 0, 0]},
                     "measurements": {"Area µm^2": 12345.6}}}]}

Every geometry is made valid (``shapely.make_valid``) after scaling and rounding, so QuPath never
sees a self-intersecting ring.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from ikdmil.errors import IkdmilError
from ikdmil.io import write_text

DEFAULT_CLASS = "Tumor"  # QuPath's built-in tumour class name
DEFAULT_COLOUR = (200, 0, 0)  # QuPath's colour for it
_NAMESPACE = uuid.UUID("6f1c7f0e-3f7a-4c55-9a54-1b0f1e0f4d2a")


def _polygons_only(geom) -> list:
    """The Polygon parts of any geometry (make_valid may return collections with lines or points)."""
    if geom is None or geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom]
    if hasattr(geom, "geoms"):
        out = []
        for g in geom.geoms:
            out.extend(_polygons_only(g))
        return out
    return []


def _rings_to_polygons(rings: list[np.ndarray]) -> list:
    """Closed (x, y) rings that never cross -> polygons with holes, by orientation and containment."""
    import shapely
    from shapely.geometry import LinearRing, Polygon

    shells, holes = [], []
    for r in rings:
        if len(r) < 4:
            continue
        ring = LinearRing(r)
        # marching squares (positive_orientation="high") walks around foreground one way and around holes
        # the other: foreground rings are clockwise in (x, y) as shapely measures it (y up)
        (holes if ring.is_ccw else shells).append(ring)
    shell_polys = [Polygon(s) for s in shells]
    if not holes or not shell_polys:
        return shell_polys
    tree = shapely.STRtree(shell_polys)
    owner: dict[int, list] = {}
    pts = [shapely.Point(h.coords[0]) for h in holes]
    hole_idx, shell_idx = tree.query(pts, predicate="within")
    best: dict[int, int] = {}
    for hi, si in zip(hole_idx.tolist(), shell_idx.tolist()):
        if hi not in best or shell_polys[si].area < shell_polys[best[hi]].area:
            best[hi] = si
    for hi, si in best.items():
        owner.setdefault(si, []).append(holes[hi])
    return [Polygon(p.exterior, owner.get(i, [])) for i, p in enumerate(shell_polys)]


def mask_polygons(mask, block: int = 2048, min_area: float = 0.0, min_hole_area: float | None = None,
                  simplify: float = 0.5) -> list:
    """Shapely polygons (pixel-edge coordinates of `mask`) for the True regions of a 2-D bool array.

    `mask` may be any array-like supporting 2-D slicing (numpy array, memmap). Regions smaller than
    `min_area` px² are dropped, holes smaller than `min_hole_area` (default: `min_area`) are filled,
    and outlines are simplified by `simplify` px (Douglas-Peucker, topology preserved).
    """
    import shapely
    from skimage.measure import find_contours

    H, W = mask.shape[:2]
    min_hole_area = min_area if min_hole_area is None else min_hole_area
    final, pool = [], []
    for y0 in range(0, H, block):
        y1 = min(y0 + block + 1, H)  # one row of overlap with the next block
        for x0 in range(0, W, block):
            x1 = min(x0 + block + 1, W)
            sub = np.asarray(mask[y0:y1, x0:x1]).astype(bool)
            if not sub.any():
                continue
            padded = np.pad(sub, 1).astype(np.float32)
            contours = find_contours(padded, 0.5, fully_connected="high", positive_orientation="high")
            rings = [np.column_stack([c[:, 1] - 0.5 + x0, c[:, 0] - 0.5 + y0]) for c in contours]
            for poly in _rings_to_polygons(rings):
                minx, miny, maxx, maxy = poly.bounds
                touches = ((x0 > 0 and minx <= x0 + 0.5) or (y0 > 0 and miny <= y0 + 0.5)
                           or (x1 < W and maxx >= x1 - 0.5) or (y1 < H and maxy >= y1 - 0.5))
                if touches:
                    pool.append(poly)
                elif poly.area >= min_area:
                    final.append(poly)
    if pool:
        final.extend(_polygons_only(shapely.unary_union(pool)))
    out = []
    for p in final:
        p = _fill_holes(p, min_hole_area)
        if simplify > 0:
            p = p.simplify(simplify, preserve_topology=True)
        for q in _polygons_only(shapely.make_valid(p)):
            if q.area >= max(min_area, 1e-9):
                out.append(q)
    out.sort(key=lambda p: (p.bounds[1], p.bounds[0]))
    return out


def _fill_holes(poly, min_hole_area: float):
    from shapely.geometry import Polygon

    if not poly.interiors:
        return poly
    keep = [h for h in poly.interiors if Polygon(h).area >= min_hole_area]
    if len(keep) == len(poly.interiors):
        return poly
    return Polygon(poly.exterior, keep)


def to_level0(polygons: list, scale: tuple[float, float], precision: float = 0.01) -> list:
    """Scale polygons by (sx, sy) into level-0 pixels, snap to a `precision` grid and make them valid."""
    import shapely
    from shapely import affinity

    out = []
    for p in polygons:
        q = affinity.scale(p, xfact=scale[0], yfact=scale[1], origin=(0, 0))
        q = shapely.set_precision(q, precision)
        out.extend(_polygons_only(shapely.make_valid(q)))
    return out


def feature_collection(polygons: list, mpp: tuple[float, float] | None, class_name: str = DEFAULT_CLASS,
                       colour: tuple[int, int, int] = DEFAULT_COLOUR, key: str = "",
                       digits: int = 2) -> dict:
    """A QuPath-importable FeatureCollection of annotations, one feature per polygon (level-0 px)."""
    from shapely.geometry import mapping

    features = []
    for i, p in enumerate(polygons):
        geom = mapping(p)
        geom = {"type": geom["type"], "coordinates": _round(geom["coordinates"], digits)}
        measurements = {}
        if mpp is not None:
            measurements["Area µm^2"] = round(p.area * mpp[0] * mpp[1], 2)
        measurements["Area px^2"] = round(p.area, 2)
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{key}:{i}")),
            "geometry": geom,
            "properties": {
                "objectType": "annotation",
                "name": class_name,
                "classification": {"name": class_name, "color": [int(c) for c in colour]},
                "isLocked": False,
                "measurements": measurements,
            },
        })
    return {"type": "FeatureCollection", "features": features}


def _round(coords, digits: int):
    if isinstance(coords, (list, tuple)) and coords and isinstance(coords[0], (int, float)):
        return [round(float(c), digits) for c in coords]
    return [_round(c, digits) for c in coords]


def write_geojson(path: str | os.PathLike, collection: dict) -> None:
    write_text(path, json.dumps(collection, ensure_ascii=False, separators=(",", ":")) + "\n")


def load_features(path: str | os.PathLike) -> list[tuple[dict, dict | None]]:
    """(properties, geometry) of each item of a GeoJSON file: a FeatureCollection, a list of Features
    (what QuPath's "Export objects as GeoJSON" writes either way), a Feature or a bare geometry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IkdmilError(f"{path}: not a readable GeoJSON file ({' '.join(str(exc).split())}); "
                          "export the annotations from QuPath as GeoJSON") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        items = data.get("features")
    elif isinstance(data, list):
        items = data
    elif isinstance(data, dict) and "type" in data:
        items = [data]
    else:
        items = None
    if not isinstance(items, list):
        raise IkdmilError(f"{path}: not GeoJSON (expected a FeatureCollection or a list of Features); "
                          "export the annotations from QuPath as GeoJSON")
    out = []
    for item in items:
        if isinstance(item, dict) and item.get("type") == "Feature":
            props = item.get("properties")
            geom = item.get("geometry")
            out.append((props if isinstance(props, dict) else {}, geom if isinstance(geom, dict) else None))
        else:
            out.append(({}, item if isinstance(item, dict) else None))
    return out


def to_shape(path: str | os.PathLike, geom: dict, where: str = ""):
    """A valid shapely geometry from a GeoJSON geometry mapping; malformed coordinates are an error naming
    `path` (and `where`, e.g. "feature 3")."""
    import shapely
    from shapely.geometry import shape

    try:
        return shapely.make_valid(shape(geom))
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, shapely.errors.ShapelyError) as exc:
        place = f" ({where})" if where else ""
        raise IkdmilError(f"{path}: malformed {geom.get('type', 'geometry')}{place} ({' '.join(str(exc).split())}); "
                          "fix or re-export the file") from None


def read_polygons(path: str | os.PathLike) -> list:
    """Polygons of a GeoJSON file (FeatureCollection, Feature, geometry, or a list of features)."""
    path = Path(path)
    polys = []
    for _, geom in load_features(path):
        if geom is None or geom.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        polys.extend(_polygons_only(to_shape(path, geom)))
    if not polys:
        raise IkdmilError(f"{path}: no Polygon or MultiPolygon geometries; draw the tissue as area annotations")
    return polys
