"""Fake QuPath exports and the slides they were drawn on, for `ikdmil prepare regions`.

- `qupath_feature` / `write_qupath_geojson`: what QuPath's "Export objects as GeoJSON" writes (a
  FeatureCollection, or a bare list of Features; the current ``classification: {name, color}`` or an
  older ``{name, colorRGB}``), annotations and detections, polygons and points;
- `write_region_csv`: the same boxes as a ``slide,x,y,w,h,label`` CSV;
- `make_fake_region_slides`: painted slides (pink tissue, purple tumour, see `fakes.slides`) with the
  boxes a pathologist would draw on them, so tests know where every image must come from.
"""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import numpy as np

from fakes.slides import painted_slide, write_slide


def _rect(x, y, w, h):
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]


def qupath_feature(coords, class_name: str | None, kind: str = "annotation", style: str = "current",
                   geometry: str = "Polygon") -> dict:
    """One QuPath feature: `coords` a box (x, y, w, h) or a ring [[x, y], ...]; `class_name` None: unclassified."""
    ring = _rect(*coords) if len(coords) == 4 and not isinstance(coords[0], (list, tuple)) else list(coords)
    if geometry == "Point":
        geom = {"type": "Point", "coordinates": ring[0]}
    else:
        geom = {"type": "Polygon", "coordinates": [ring]}
    props: dict = {"objectType": kind, "isLocked": False}
    if class_name is not None:
        props["classification"] = ({"name": class_name, "color": [200, 0, 0]} if style == "current"
                                   else {"name": class_name, "colorRGB": -3670016})
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": geom, "properties": props}


def write_qupath_geojson(path, features: list[dict], as_list: bool = False) -> Path:
    """A QuPath export: a FeatureCollection, or (`as_list`, older QuPath) a bare JSON list of features."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = features if as_list else {"type": "FeatureCollection", "features": features}
    path.write_text(json.dumps(doc, indent=1))
    return path


def write_region_csv(path, rows: list[tuple[str, tuple[int, int, int, int], str]]) -> Path:
    """slide,x,y,w,h,label rows from (slide, box, label)."""
    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "x", "y", "w", "h", "label"])
        for slide, (x, y, bw, bh), label in rows:
            w.writerow([slide, x, y, bw, bh, label])
    return path


#: the boxes drawn on each fake slide (level-0 px; slides are 512 x 384 px at 1 µm/px)
TUMOUR_BOX = (40, 40, 80, 60)  # 40 x 30 px at 2 µm/px: kept whole
LARGE_TUMOUR_BOX = (200, 40, 160, 96)  # 80 x 48 px at 2 µm/px: tiled into 3 x 2 tiles of 32 px
NORMAL_BOX = (40, 200, 128, 128)  # 64 x 64 px at 2 µm/px: 2 x 2 tiles of 32 px
SLIDE_SIZE = (512, 384)
TISSUE = (16, 16, 480, 352)


def make_fake_region_slides(root, seed: int = 0) -> dict:
    """SLIDES (t1-t3 with tumour, n1-n3 without, 1 µm/px, 3 levels), their regions and a normal-slides file.

    t1 has a large tumour region too. n1 and n2 carry a Normal box; n3 has no labels and is listed in
    ``normal_slides.txt``. Returns {"slides": dir, "regions": {slide: [(box, class)]}, "normal_slides": file}.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    regions: dict[str, list] = {}
    for name in ("t1", "t2", "t3", "n1", "n2", "n3"):
        tumour = [TUMOUR_BOX] if name.startswith("t") else []
        if name == "t1":
            tumour.append(LARGE_TUMOUR_BOX)
        img, _ = painted_slide(rng, SLIDE_SIZE, [TISSUE], tumour)
        write_slide(root / "slides" / f"{name}.tif", img, mpp=1.0, tile=64, levels=3)
        if name != "n3":
            regions[name] = [(b, "Tumor") for b in tumour] + [(NORMAL_BOX, "Normal")]
    normal = root / "normal_slides.txt"
    normal.write_text("n3\n")
    return {"slides": root / "slides", "regions": regions, "normal_slides": normal}


def write_exports(folder, regions: dict[str, list]) -> Path:
    """One QuPath export per slide in `folder`, in the export styles QuPath has used (see the module
    docstring): t2 as a bare list with old-style classes, t3 named ``t3.tif.geojson``; t1 also holds a
    detection and a point annotation (neither is a region) and an Ignore* area."""
    folder = Path(folder)
    for slide, boxes in regions.items():
        feats = [qupath_feature(b, c, style="old" if slide == "t2" else "current") for b, c in boxes]
        if slide == "t1":
            feats += [qupath_feature((60, 60, 10, 10), "Tumor", kind="detection"),
                      qupath_feature((300, 300, 1, 1), "Tumor", geometry="Point"),
                      qupath_feature((380, 220, 60, 60), "Ignore*")]
        name = "t3.tif.geojson" if slide == "t3" else f"{slide}.geojson"
        write_qupath_geojson(folder / name, feats, as_list=slide == "t2")
    return folder
