"""Tissue detection on an overview, morphology, and user tissue masks (GeoJSON or image)."""

import json

import numpy as np
import pytest
from fakes.slides import painted_slide
from PIL import Image
from shapely.geometry import box

from ikdmil.errors import IkdmilError
from ikdmil.slide.geojson import feature_collection
from ikdmil.slide.reader import open_slide
from ikdmil.slide.tissue import TissueParams, binary_close, detect_tissue, slide_tissue


def test_tissue_detection_separates_tissue_from_glass():
    rng = np.random.default_rng(2)
    img, _ = painted_slide(rng, (400, 300), tissue=[(40, 40, 200, 180)], tumour=[(260, 100, 60, 60)])
    mask, thr = detect_tissue(img, mpp=2.0, params=TissueParams(min_object_um2=100, max_hole_um2=100))
    assert 0.05 <= thr <= 0.15
    assert mask[40:220, 40:240].mean() > 0.97 and mask[100:160, 260:320].mean() > 0.97
    assert mask[:30].mean() < 0.01 and mask[:, 340:].mean() < 0.01
    # an image that is all tissue stays whole (the Otsu threshold is clamped), a blank one stays empty
    full, _ = detect_tissue(img[50:200, 50:230], mpp=2.0)
    assert full.mean() > 0.97
    blank, _ = detect_tissue(np.full((100, 100, 3), 240, np.uint8) + rng.integers(0, 4, (100, 100, 3), dtype=np.uint8),
                             2.0)
    assert not blank.any()


def test_closing_bridges_narrow_gaps_only_and_keeps_shapes():
    m = np.zeros((60, 100), bool)
    m[10:50, 10:40] = True
    m[10:50, 44:60] = True  # 4 px gap: bridged by a radius-3 closing
    m[10:50, 70:90] = True  # 10 px gap: kept
    for radius in (3, 4.5):  # octagon steps; the distance-transform path for large radii is checked below
        closed = binary_close(m, radius)
        assert (closed >= m).all()  # extensive
        assert closed[20:40, 40:44].all() and not closed[20:40, 62:68].any()
        assert not closed[:8].any() and not closed[52:].any() and not closed[:, :8].any()  # nothing grows outside
        assert (binary_close(m[10:50, 10:40], radius)).all()  # a block touching the border stays whole
    big = np.zeros((200, 300), bool)
    big[20:180, 20:120] = True
    big[20:180, 138:200] = True  # 18 px gap: bridged with radius 10, not with 8
    big[20:180, 230:280] = True  # 30 px gap: kept
    closed = binary_close(big, 10)
    assert closed[50:150, 120:138].all() and not closed[50:150, 205:225].any() and (closed >= big).all()
    assert not binary_close(big, 8)[50:150, 125:133].any()


def test_user_tissue_masks_from_geojson_and_image(tmp_path, fake_slide):
    path, _, _ = fake_slide
    fc = feature_collection([box(64, 64, 192, 192)], None)
    (tmp_path / "t.geojson").write_text(json.dumps(fc))
    with open_slide(path) as s:
        t, _ = slide_tissue(s, user_mask=tmp_path / "t.geojson")
        assert t.source.startswith("geojson:")
        assert t.fraction(64, 64, 128, 128) == pytest.approx(1.0)
        assert t.fraction(256, 0, 64, 64) == 0.0
        m = np.zeros((64, 96), np.uint8)
        m[:, 48:] = 255  # right half, at 1/4 scale
        Image.fromarray(m).save(tmp_path / "t.png")
        t, _ = slide_tissue(s, user_mask=tmp_path / "t.png")
        assert t.fraction(200, 0, 184, 256) == pytest.approx(1.0) and t.fraction(0, 0, 180, 256) == 0.0
        Image.fromarray(np.zeros((10, 40), np.uint8)).save(tmp_path / "bad.png")
        with pytest.raises(IkdmilError, match="aspect ratio"):
            slide_tissue(s, user_mask=tmp_path / "bad.png")
