"""Slide reading, resolution, tissue detection, pyramidal TIFF output, mask -> GeoJSON polygons."""

import json

import numpy as np
import openslide
import pytest
import shapely
from PIL import Image
from shapely.geometry import box, shape

from ikdmil.slide.tissue import TissueParams, binary_close, detect_tissue, slide_tissue
from ikdmil.slide.reader import ImageSlide, open_slide, read_overview, read_scaled
from ikdmil.slide.tiff import write_pyramid_tiff
from ikdmil.errors import IkdmilError
from ikdmil.slide.geojson import feature_collection, mask_polygons, read_polygons, to_level0
from ikdmil.inference import BandStitcher, blend_window, slide_geometry
from fakes.slides import painted_slide, synth_slide, write_asap_xml, write_slide


@pytest.fixture(scope="module")
def fake_slide(tmp_path_factory):
    rng = np.random.default_rng(0)
    img, mask = synth_slide(rng, 4, 6, 64, tumour={(1, 2)}, glass={(0, 0), (0, 1)})
    path = write_slide(tmp_path_factory.mktemp("slide") / "s.tif", img, mpp=0.25, tile=64, levels=3)
    return path, img, mask


def test_openslide_reads_the_fake_slide_with_levels_and_mpp(fake_slide):
    path, img, _ = fake_slide
    with open_slide(path) as s:
        assert s.kind == "openslide:generic-tiff"
        assert s.dimensions == (384, 256)
        assert s.level_count == 3 and s.level_downsamples == (1.0, 2.0, 4.0)
        assert s.mpp == pytest.approx((0.25, 0.25)) and s.mpp_source == "metadata"
        assert (s.read_region((10, 20), 0, (50, 30)) == img[20:50, 10:60]).all()
        # the same file with --mpp: the override wins
    with open_slide(path, mpp=0.3) as s:
        assert s.mpp == (0.3, 0.3) and s.mpp_source == "--mpp"


def test_read_scaled_copies_exactly_at_scale_one_and_downsamples_from_the_finer_level(fake_slide):
    path, img, _ = fake_slide
    with open_slide(path) as s:
        assert (read_scaled(s, (64, 32, 100, 80), (100, 80)) == img[32:112, 64:164]).all()
        assert s.best_level(2.0) == 1 and s.best_level(3.0) == 1 and s.best_level(1.5) == 0
        half = read_scaled(s, (0, 0, 384, 256), (192, 128)).astype(float)  # level 1, exact
        three = read_scaled(s, (0, 0, 384, 256), (128, 85)).astype(float)  # level 1 -> resampled
        assert half.shape == (128, 192, 3) and three.shape == (85, 128, 3)
        ref = img.reshape(128, 2, 192, 2, 3).mean(axis=(1, 3))
        assert np.abs(half - ref).mean() < 3
        assert abs(three.mean() - img.mean()) < 3
        # beyond the slide: white glass
        assert (s.read_region((380, 250), 0, (20, 20))[10:, 10:] == 255).all()
        assert read_overview(s, 4.0).shape == (64, 96, 3)


def test_plain_images_read_mpp_from_dpi_and_fail_clearly_without(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "with.png", dpi=(25400 / 0.5, 25400 / 0.5))
    Image.fromarray(img).save(tmp_path / "screen.png", dpi=(72, 72))
    Image.fromarray(img).save(tmp_path / "plain.jpg")
    s = open_slide(tmp_path / "with.png")
    assert isinstance(s, ImageSlide) and s.mpp == pytest.approx((0.5, 0.5), rel=1e-3)
    assert (s.read_region((0, 0), 0, (50, 40)) == img).all()
    for name in ("screen.png", "plain.jpg"):  # 72 dpi is a screen default, not a scan: treated as missing
        s = open_slide(tmp_path / name)
        assert s.mpp is None
        with pytest.raises(IkdmilError, match=r"no resolution .* pass --mpp"):
            s.require_mpp()
    assert open_slide(tmp_path / "plain.jpg", mpp=0.25).mpp == (0.25, 0.25)


def test_unreadable_files_give_one_line_errors(tmp_path):
    (tmp_path / "junk.svs").write_bytes(b"not a slide" * 50)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 30)
    for name in ("junk.svs", "junk.png", "missing.tif"):
        with pytest.raises(IkdmilError) as exc:
            open_slide(tmp_path / name)
        assert name in str(exc.value) and "\n" not in str(exc.value)


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
    blank, _ = detect_tissue(np.full((100, 100, 3), 240, np.uint8) + rng.integers(0, 4, (100, 100, 3), dtype=np.uint8), 2.0)
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


def test_pyramid_tiff_opens_in_openslide_with_levels_and_mpp(tmp_path):
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 256, (600, 1000), dtype=np.uint8)
    shapes = write_pyramid_tiff(tmp_path / "p.tif", arr, (2.0, 2.0), tile=128, min_size=128)
    assert shapes == [(600, 1000), (300, 500), (150, 250), (75, 125)]
    s = openslide.OpenSlide(str(tmp_path / "p.tif"))
    assert s.level_count == 4
    assert s.level_dimensions == ((1000, 600), (500, 300), (250, 150), (125, 75))
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(2.0)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(2.0)
    level0 = np.asarray(s.read_region((0, 0), 0, (1000, 600)))[..., 0]
    assert (level0 == arr).all()
    level1 = np.asarray(s.read_region((0, 0), 1, (500, 300)))[..., 0].astype(int)
    ref = arr.reshape(300, 2, 500, 2).astype(int).sum(axis=(1, 3))
    assert np.abs(level1 - (ref + 2) // 4).max() == 0
    assert not list(tmp_path.glob(".*"))  # no scratch files left behind


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


def test_band_stitcher_blends_overlapping_tiles_without_seams():
    geom = slide_geometry((200, 120), (0.5, 0.5), 0.5, tile=32, overlap=16, out_stride=4)
    assert geom.grid == (12, 7) and geom.out_size == (50, 30)
    prob = np.zeros((30, 50), np.uint8)
    mask = np.zeros_like(prob)
    st = BandStitcher(prob, mask, band=8, threshold=0.5)
    win = blend_window(8, 4)
    for r in range(geom.grid[1]):
        for c in range(geom.grid[0]):
            st.add(r * 4, c * 4, np.full((8, 8), 0.6, np.float32), win)
    st.close()
    assert (prob == 153).all() and (mask == 255).all()  # a constant map stays exactly constant
    assert st.tumour_px == st.tissue_px == 1500


@pytest.mark.parametrize("sigma", [0.0, 1.5, 3.0])
def test_tile_smoothing_on_the_device_equals_evaluation_smoothing(sigma):
    import torch

    from ikdmil.inference import gaussian_smooth
    from ikdmil.metrics import smooth_probability

    x = np.random.default_rng(6).random((3, 40, 56)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(x), sigma).numpy()
    assert np.abs(ours - smooth_probability(x, sigma)).max() < 1e-5


def test_the_convolution_smoothing_path_used_on_gpus_matches_scipy():
    import torch

    from ikdmil.inference import gaussian_smooth
    from ikdmil.metrics import smooth_probability

    x = np.random.default_rng(7).random((2, 48, 40)).astype(np.float32)
    for sigma in (1.0, 3.0):
        ours = gaussian_smooth(torch.from_numpy(x), sigma, conv=True).numpy()
        assert np.abs(ours - smooth_probability(x, sigma)).max() < 1e-5
    tiny = x[:, :5, :6]  # smaller than the kernel
    assert np.abs(gaussian_smooth(torch.from_numpy(tiny), 3.0, conv=True).numpy()
                  - smooth_probability(tiny, 3.0)).max() < 1e-5
