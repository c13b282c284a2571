"""Masks to QuPath GeoJSON polygons and annotation files back in (QuPath exports, ASAP / Camelyon16 XML)."""

import json

import numpy as np
import pytest
import shapely
from fakes.slides import write_asap_xml
from shapely.geometry import box, shape

from ikdmil.errors import IkdmilError
from ikdmil.slide.geojson import feature_collection, mask_polygons, read_polygons, to_level0


def test_mask_polygons_trace_regions_with_holes_across_blocks():
    m = np.zeros((90, 120), bool)
    m[10:60, 5:100] = True  # a big region crossing block borders, with a hole
    m[20:40, 30:50] = False
    m[70:73, 110:113] = True  # a 9 px fragment
    m[80:85, 5:10] = True
    whole = mask_polygons(m, block=4096, min_area=0, simplify=0)
    blocks = mask_polygons(m, block=16, min_area=0, simplify=0)
    for polys in (whole, blocks):
        assert len(polys) == 3 and all(p.is_valid for p in polys)
        big = max(polys, key=lambda p: p.area)
        assert len(big.interiors) == 1
        assert big.area == pytest.approx(50 * 95 - 20 * 20, abs=3)
    assert shapely.unary_union(whole).symmetric_difference(shapely.unary_union(blocks)).area < 1e-6
    kept = mask_polygons(m, block=16, min_area=20, simplify=0.5)
    assert len(kept) == 2  # the 9 px fragment is dropped
    no_holes = mask_polygons(m, block=16, min_area=20, min_hole_area=500)
    assert not max(no_holes, key=lambda p: p.area).interiors  # the 400 px hole is filled


def test_feature_collection_is_qupath_annotations_in_level0_pixels():
    polys = to_level0([box(1, 2, 5, 4)], (8.0, 8.0))
    fc = json.loads(json.dumps(feature_collection(polys, (0.25, 0.25), key="s")))
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 1
    f = fc["features"][0]
    assert f["type"] == "Feature" and f["id"]
    assert f["properties"]["objectType"] == "annotation"
    assert f["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    g = shape(f["geometry"])
    assert g.is_valid and g.bounds == (8.0, 16.0, 40.0, 32.0)
    assert f["properties"]["measurements"]["Area µm^2"] == pytest.approx(32 * 16 * 0.0625)


def test_read_polygons_accepts_qupath_exports(tmp_path):
    feature = feature_collection([box(0, 0, 10, 10)], None)["features"][0]
    (tmp_path / "list.geojson").write_text(json.dumps([feature]))
    (tmp_path / "geom.json").write_text(json.dumps(feature["geometry"]))
    (tmp_path / "none.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    assert read_polygons(tmp_path / "list.geojson")[0].area == 100
    assert read_polygons(tmp_path / "geom.json")[0].area == 100
    with pytest.raises(IkdmilError, match="no Polygon"):
        read_polygons(tmp_path / "none.geojson")


def test_asap_xml_tumour_minus_exclusion(tmp_path):
    from ikdmil.prepare.camelyon16 import read_asap_xml

    sq = lambda x, y, w: [(x, y), (x + w, y), (x + w, y + w), (x, y + w)]  # noqa: E731
    write_asap_xml(tmp_path / "a.xml", [sq(0, 0, 100), sq(200, 0, 50), sq(25, 25, 50)], ["_0", "_1", "_2"])
    geom, n_t, n_x = read_asap_xml(tmp_path / "a.xml")
    assert (n_t, n_x) == (2, 1)
    assert geom.area == pytest.approx(100 * 100 + 50 * 50 - 50 * 50)
    (tmp_path / "bad.xml").write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(IkdmilError, match="bad.xml"):
        read_asap_xml(tmp_path / "bad.xml")
