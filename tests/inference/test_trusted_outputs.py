"""Outputs a user can trust: overlay size and outlines, per-slide sanity warnings, the HTML report."""

import html
import json
import logging
import re

import numpy as np
import pytest
from fakes.slides import (
    PINK,
    PURPLE,
    WHITE,
    dark_backbone,
    dark_detector_model,
    synth_slide,
    write_slide,
)
from PIL import Image
from scipy import ndimage

from ikdmil.cli import main
from ikdmil.errors import IkdmilError
from ikdmil.inference import PredictSettings, predict
from ikdmil.prepare.synth import synth_image
from ikdmil.slide import reader
from ikdmil.stain import scale_stains, training_stats
from ikdmil.visualize import PRED_COLOUR, TISSUE_COLOUR

QUIET = {"progress": False, "echo": lambda *a: None}


def flat_image(size: int, tissue: tuple, tumour: tuple) -> np.ndarray:
    """Glass with one pink tissue and one purple tumour rectangle (x0, y0, x1, y1), flat (fast to encode)."""
    img = np.full((size, size, 3), WHITE, np.uint8)
    img[tissue[1]:tissue[3], tissue[0]:tissue[2]] = PINK
    img[tumour[1]:tumour[3], tumour[0]:tumour[2]] = PURPLE
    return img


def ring(shape, box, width) -> np.ndarray:
    """Pixels within `width` of the border of the rectangle `box` (x0, y0, x1, y1)."""
    m = np.zeros(shape, bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return ndimage.binary_dilation(m, iterations=width) & ~ndimage.binary_erosion(m, iterations=width)


def colour_pixels(img: np.ndarray, colour) -> np.ndarray:
    found = (img == np.array(colour, np.uint8)).all(-1)
    found[:60, :200] = False  # the legend
    return found


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    train = np.stack([synth_image(rng, 64, float(i % 2))[0] for i in range(24)])
    stain = training_stats(train).to_meta()
    with dark_backbone():
        yield {"normal": dark_detector_model(root / "normal.safetensors", stain=stain),
               # weight 100: pink tissue is "dark" enough too, so every tissue pixel is called tumour
               "all_tumour": dark_detector_model(root / "all.safetensors", weight=100.0, stain=stain),
               "no_stats": dark_detector_model(root / "old.safetensors"),
               "coarse": dark_detector_model(root / "coarse.safetensors", input_size=128, mpp=4.0)}


def test_the_overlay_of_a_4k_image_is_large_and_outlines_tissue_and_tumour(models, tmp_path):
    tissue, tumour = (400, 400, 3400, 3200), (1000, 1000, 2200, 1900)
    Image.fromarray(flat_image(4096, tissue, tumour)).save(tmp_path / "big.png", dpi=(50800, 50800))  # 0.5 µm/px
    rep = predict(models["coarse"], [tmp_path / "big.png"], tmp_path / "o", PredictSettings(workers=0, sigma=0),
                  **QUIET)
    assert not rep.failures
    s = rep.slides[0]
    assert s["output_size"] == [128, 128]  # the map: 4 model px of 4 µm per px
    over = np.asarray(Image.open(tmp_path / "o" / "big" / "overlay.png").convert("RGB"))
    assert over.shape[:2] == (2048, 2048)  # --thumbnail-size, whatever the map's stride
    assert Image.open(tmp_path / "o" / "big" / "heatmap.png").size == (2048, 2048)
    blue, green = colour_pixels(over, TISSUE_COLOUR), colour_pixels(over, PRED_COLOUR)
    tissue_ring = ring(blue.shape, [v // 2 for v in tissue], 6)
    tumour_ring = ring(green.shape, [v // 2 for v in tumour], 16)  # the map's pixel is 16 thumbnail px
    assert blue.sum() > 4 * 1400 * 2 and blue[tissue_ring].mean() > 0.2 and not blue[~tissue_ring].any()
    assert green.sum() > 4 * 500 * 2 and green[~tumour_ring].sum() < 0.01 * green.sum()
    for side in (tumour_ring[:, 480:520], tumour_ring[480:520], tumour_ring[:, 1080:1120], tumour_ring[930:970]):
        assert side.any()
    inside = over[700:800, 700:900].reshape(-1, 3).mean(0)  # the tumour is tinted green, not drawn over
    assert abs(inside[1] - (0.75 * PURPLE[1] + 0.25 * PRED_COLOUR[1])) < 3
    assert s["overlay_legend"]["tissue outline"] == "#00aaff"


def test_a_slide_thumbnail_is_read_from_the_pyramid_never_level_0(models, tmp_path, monkeypatch):
    slide = write_slide(tmp_path / "p.tif", flat_image(2048, (300, 200, 1700, 1800), (600, 600, 900, 900)),
                        mpp=0.25, tile=256, levels=3)
    levels = []
    real = reader.OpenSlideSlide.read_region
    monkeypatch.setattr(reader.OpenSlideSlide, "read_region",
                        lambda self, loc, level, size: levels.append(level) or real(self, loc, level, size))
    m = dark_detector_model(tmp_path / "m.safetensors", input_size=128, mpp=1.0)
    rep = predict(m, [slide], tmp_path / "o", PredictSettings(workers=0, thumbnail_size=1024), **QUIET)
    assert not rep.failures
    assert Image.open(tmp_path / "o" / "p" / "overlay.png").size == (1024, 1024)
    # tissue overview (512 px) and tiles (1 µm/px) come from level 2, the 1024 px thumbnail from level 1
    assert levels and 0 not in levels and 1 in levels


def test_tumour_everywhere_warns_once_for_an_all_tumour_model_and_not_for_a_normal_one(models, tmp_path, caplog):
    img = flat_image(512, (50, 50, 460, 460), (100, 100, 200, 200))
    slide = write_slide(tmp_path / "s.tif", img, mpp=0.5, levels=2)
    with caplog.at_level(logging.WARNING, logger="ikdmil"):
        normal = predict(models["normal"], [slide], tmp_path / "n", PredictSettings(workers=0), **QUIET).slides[0]
        assert normal["warnings"] == [] and not caplog.records
        everything = predict(models["all_tumour"], [slide], tmp_path / "a", PredictSettings(workers=0),
                             **QUIET).slides[0]
    assert everything["tumour_fraction_of_tissue"] > 0.95
    assert len(everything["warnings"]) == 1 and "% of the tissue is called tumour" in everything["warnings"][0]
    assert [r.getMessage() for r in caplog.records] == everything["warnings"]  # logged once
    on_disk = json.loads((tmp_path / "a" / "s" / "summary.json").read_text())
    index = json.loads((tmp_path / "a" / "predict_summary.json").read_text())
    assert on_disk["warnings"] == index["slides"][0]["warnings"] == everything["warnings"]


@pytest.fixture(scope="module")
def stain_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("stain")
    img, _ = synth_slide(np.random.default_rng(1), 4, 4, 64, tumour={(1, 1)}, glass={(0, 0)})
    return {"same": write_slide(root / "same.tif", img, mpp=0.5, levels=2),
            "shifted": write_slide(root / "shifted.tif", scale_stains(img, haematoxylin=2.5), mpp=0.5, levels=2)}


def test_the_stain_warning_fires_on_a_shifted_stain_only(models, stain_slides, tmp_path):
    rep = predict(models["normal"], list(stain_slides.values()), tmp_path / "o", PredictSettings(workers=0), **QUIET)
    assert not rep.failures
    same, shifted = rep.slides
    assert same["stain"]["checked"] and max(same["stain"]["z"]) < 1.5 and same["warnings"] == []
    assert shifted["stain"]["z"][0] > 4 and len(shifted["warnings"]) == 1
    assert "stain far from the training data's (haematoxylin stronger" in shifted["warnings"][0]


def test_a_model_without_stain_statistics_skips_the_check(models, stain_slides, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="ikdmil.inference.sanity"):
        s = predict(models["no_stats"], [stain_slides["shifted"]], tmp_path / "o", PredictSettings(workers=0),
                    **QUIET).slides[0]
    assert s["stain"] == {"checked": False, "reason": "the model file has no stain statistics"}
    assert s["warnings"] == []
    assert any("no stain statistics" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_damaged_stain_statistics_stop_predict_with_one_line(models, stain_slides, tmp_path, capsys):
    bad = dark_detector_model(tmp_path / "bad.safetensors", stain={"space": "skimage-rgb2hed", "mean": [1, 2]})
    with pytest.raises(IkdmilError, match=r"bad.safetensors: damaged stain statistics .* retrain"):
        predict(bad, [stain_slides["same"]], tmp_path / "o", **QUIET)
    assert main(["predict", str(bad), str(stain_slides["same"]), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "damaged stain statistics" in err


def test_the_report_lists_every_slide_with_its_warnings_overlay_and_outputs(models, tmp_path, capsys):
    slides = tmp_path / "slides"
    write_slide(slides / "a_tumour.tif", flat_image(512, (50, 50, 460, 460), (50, 50, 460, 460)), mpp=0.5, levels=2)
    write_slide(slides / "b_normal.tif", flat_image(512, (50, 50, 460, 460), (100, 100, 200, 200)), mpp=0.5,
                levels=2)
    (slides / "c_broken.tif").write_bytes(b"not a slide" * 50)
    assert main(["predict", str(models["normal"]), str(slides), "--out", str(tmp_path / "o"), "--workers", "0",
                 "--quiet"]) == 1  # c_broken failed
    out = capsys.readouterr().out
    assert f"1 slides with warnings; overview: {tmp_path / 'o' / 'report.html'}" in out
    page = (tmp_path / "o" / "report.html").read_text()
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # nothing fetched
    rows = re.findall(r"<tr><td><a href=\"([^\"]+)\"><img src=\"([^\"]+)\".*?</tr>", page)
    assert [href for href, _ in rows] == ["a_tumour/overlay.png", "b_normal/overlay.png"]
    for href, src in rows:
        assert href == src and (tmp_path / "o" / src).is_file()
    by_slide = {s["slide"]: s for s in (json.loads(p.read_text()) for p in (tmp_path / "o").glob("*/summary.json"))}
    warning = by_slide["a_tumour.tif"]["warnings"][0]
    assert html.escape(warning) in page and by_slide["b_normal.tif"]["warnings"] == []
    assert "c_broken.tif" in page and "1 failed" in page and "2 slides, 1 with warnings" in page
    for name in ("probability.tif", "mask.tif", "tumour.geojson", "summary.json"):
        assert f'href="b_normal/{name}"' in page
    assert f"{by_slide['b_normal.tif']['tumour_area_mm2']:.3f}" in page
