"""`ikdmil predict` end to end on tiny generated slides: outputs, geometry, tiling, failures, patches."""

import json

import numpy as np
import openslide
import pytest
import tifffile
import torch
import yaml
from fakes.slides import dark_backbone, dark_detector_model, painted_slide, synth_slide, vgg_model, write_slide
from PIL import Image
from shapely.geometry import box, shape

from ikdmil.cli import main
from ikdmil.inference import PredictSettings, predict
from ikdmil.models.checkpoint import load_model

TUMOUR = [(200, 150, 300, 200), (560, 420, 240, 160)]  # level-0 (x, y, w, h) rectangles


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    img, truth = painted_slide(rng, (900, 700), tissue=[(50, 50, 800, 600)], tumour=TUMOUR)
    slide = write_slide(root / "slides" / "case1.tif", img, mpp=0.25, tile=64, levels=3)
    with dark_backbone():  # registered for this module only
        model = dark_detector_model(root / "dark.safetensors", input_size=64)
        yield {"root": root, "slide": slide, "truth": truth, "model": model, "image": img}


@pytest.fixture(scope="module")
def predicted(world):
    out = world["root"] / "out"
    code = main(["predict", str(world["model"]), str(world["slide"]), "--out", str(out), "--sigma", "0",
                 "--workers", "1", "--quiet"])
    assert code == 0
    return out / "case1"


def test_slide_outputs_exist_and_summary_measures_the_tumour(predicted, world):
    for name in ("probability.tif", "mask.tif", "tumour.geojson", "overlay.png", "heatmap.png", "tissue.png",
                 "summary.json"):
        assert (predicted / name).is_file(), name
    s = json.loads((predicted / "summary.json").read_text())
    true_mm2 = world["truth"].sum() * 0.25 * 0.25 / 1e6
    assert s["tumour_area_mm2"] == pytest.approx(true_mm2, rel=0.1)
    assert s["tumour_fraction_of_tissue"] == pytest.approx(world["truth"].sum() / (800 * 600), rel=0.1)
    assert s["tissue"]["area_mm2"] == pytest.approx(800 * 600 * 0.0625 / 1e6, rel=0.1)
    assert s["model_mpp"] == 0.5 and s["model_mpp_source"].startswith("default")
    assert s["read_level"] == 1  # 0.5 µm/px is level 1 of a 0.25 µm/px slide
    assert 0 < s["tiles"] <= s["tiles_total"] and s["seconds"] > 0 and s["workers"] == 1
    cfg = yaml.safe_load((predicted.parent / "predict_config.yaml").read_text())
    assert cfg["settings"]["sigma"] == 0 and cfg["model_mpp"] == 0.5
    assert Image.open(predicted / "overlay.png").size[0] <= 2048


def test_probability_pyramid_opens_in_openslide_with_levels_and_mpp(predicted):
    s = openslide.OpenSlide(str(predicted / "probability.tif"))
    # 900 x 700 px at 0.25 µm/px = 225 x 175 µm; model 0.5 µm/px x out-stride 4 = 2 µm/px -> 113 x 88
    assert s.level_dimensions[0] == (113, 88)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(2.0)
    big = np.zeros((1200, 1100), np.uint8)  # a bigger map gets more levels, each with its mpp
    from ikdmil.slide.tiff import write_pyramid_tiff

    write_pyramid_tiff(predicted.parent / "big.tif", big, (2.0, 2.0))
    s = openslide.OpenSlide(str(predicted.parent / "big.tif"))
    assert s.level_count == 4 and s.level_downsamples == pytest.approx((1, 2, 4, 8), rel=0.01)
    m = openslide.OpenSlide(str(predicted / "mask.tif"))
    mask = np.asarray(m.read_region((0, 0), 0, m.dimensions))[..., 0] > 0
    assert 0 < mask.mean() < 0.5


def test_geojson_polygons_are_valid_and_land_on_the_drawn_tumour(predicted):
    fc = json.loads((predicted / "tumour.geojson").read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
    polys = []
    for f in fc["features"]:
        g = shape(f["geometry"])
        assert g.is_valid and g.geom_type == "Polygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tumor"
        assert f["properties"]["measurements"]["Area µm^2"] == pytest.approx(g.area * 0.0625, rel=1e-3)
        polys.append(g)
    for x, y, w, h in TUMOUR:  # each drawn rectangle is matched by one polygon in level-0 pixels
        truth = box(x, y, x + w, y + h)
        best = max(polys, key=lambda p: p.intersection(truth).area)
        assert best.intersection(truth).area / best.union(truth).area > 0.85


def test_tiled_and_stitched_prediction_equals_a_whole_image_forward_pass(tmp_path):
    rng = np.random.default_rng(1)
    img, _ = synth_slide(rng, 4, 4, 64, tumour={(1, 1), (2, 2)})
    slide = write_slide(tmp_path / "v.tif", img, mpp=0.5, tile=64, levels=2)
    model_file = vgg_model(tmp_path / "vgg.safetensors", input_size=64, gain=30)
    model, _ = load_model(model_file)
    with torch.no_grad():
        whole = model.eval()(torch.from_numpy(img).permute(2, 0, 1)[None]).fused[0, 0].numpy()
    assert whole.std() > 0.05  # the map really depends on the image
    diffs = {}
    for overlap in (0, 32):
        out = tmp_path / f"o{overlap}"
        settings = PredictSettings(sigma=0, out_stride=1, overlap=overlap, all_tissue=True, workers=0, batch_size=16)
        rep = predict(model_file, [slide], out, settings, progress=False, echo=lambda *a: None)
        assert not rep.failures
        tiled = tifffile.imread(out / "v" / "probability.tif", key=0).astype(np.float32) / 255
        assert tiled.shape == whole.shape
        diffs[overlap] = np.abs(tiled - whole)
    assert diffs[32].max() < 0.05 and diffs[32].mean() < 0.004  # uint8 quantisation is 0.002
    assert diffs[0].max() > 3 * diffs[32].max()  # without overlap the tile borders show: blending matters


def test_progress_lines_go_to_the_logger_or_to_echo(world, tmp_path, caplog):
    settings = PredictSettings(workers=0, batch_size=32)
    with caplog.at_level("INFO", logger="ikdmil.inference"):
        predict(world["model"], [world["slide"]], tmp_path / "o", settings, progress=False)
    assert any(r.name == "ikdmil.inference.predict" and "[1/1] case1.tif:" in r.getMessage() for r in caplog.records)
    caplog.clear()
    lines = []
    with caplog.at_level("INFO", logger="ikdmil.inference"):
        predict(world["model"], [world["slide"]], tmp_path / "o", settings, progress=False, echo=lines.append)
    assert lines == [f"[1/1] case1.tif: already done with these settings, skipped ({tmp_path / 'o' / 'case1'}; "
                     "--overwrite to redo)"]
    assert not [r for r in caplog.records if r.name.startswith("ikdmil.inference.predict")]


def test_a_slide_without_mpp_fails_with_a_clear_message_and_works_with_mpp(world, tmp_path, capsys):
    nompp = write_slide(tmp_path / "nompp.tif", world["image"][:256, :256], mpp=None, tile=64, levels=2)
    code = main(["predict", str(world["model"]), str(nompp), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "nompp.tif: no resolution (µm/px) in the slide's metadata; pass --mpp" in err
    assert not (tmp_path / "o" / "nompp").exists()
    code = main(["predict", str(world["model"]), str(nompp), "--out", str(tmp_path / "o"), "--mpp", "0.25", "--quiet"])
    assert code == 0
    s = json.loads((tmp_path / "o" / "nompp" / "summary.json").read_text())
    assert s["mpp_source"] == "--mpp" and s["mpp"] == [0.25, 0.25]


def test_a_corrupt_slide_is_reported_and_skipped_while_the_batch_goes_on(world, tmp_path, capsys):
    slides = tmp_path / "slides"
    good = write_slide(slides / "a_good.tif", world["image"][:320, :320], mpp=0.25, tile=64, levels=2)
    (slides / "b_garbage.svs").write_bytes(b"definitely not a slide" * 100)
    bad = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as tf:
        offsets, counts = tf.pages[0].dataoffsets, tf.pages[0].databytecounts
    for o, c in zip(offsets[3:12], counts[3:12]):
        bad[o:o + c] = np.random.default_rng(0).integers(0, 255, c, dtype=np.uint8).tobytes()
    (slides / "c_damaged.tif").write_bytes(bytes(bad))
    write_slide(slides / "d_good.tif", world["image"][300:620, 300:620], mpp=0.25, tile=64, levels=2)
    out = tmp_path / "out"
    code = main(["predict", str(world["model"]), str(slides), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if line.startswith("ikdmil: error:")]
    assert len(errors) == 2
    assert "b_garbage.svs" in errors[0] and "c_damaged.tif" in errors[1] and "corrupt" in errors[1]
    assert (out / "a_good" / "summary.json").is_file() and (out / "d_good" / "summary.json").is_file()
    assert not (out / "c_damaged").exists() and not list(out.glob(".c_damaged*"))
    batch = json.loads((out / "predict_summary.json").read_text())
    assert [f["input"].split("/")[-1] for f in batch["failures"]] == ["b_garbage.svs", "c_damaged.tif"]
    # running again skips the finished slides and retries only the failed ones
    code = main(["predict", str(world["model"]), str(slides), "--out", str(out), "--quiet"])
    assert code == 1 and "already done" in capsys.readouterr().out


def test_patch_images_get_a_mask_and_an_overlay_each(world, tmp_path, capsys):
    folder = tmp_path / "patches"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        img, _ = painted_slide(rng, (120, 100), tissue=[(0, 0, 120, 100)], tumour=[(20 * i, 10, 40, 50)])
        Image.fromarray(img).save(folder / f"p{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    code = main(["predict", str(world["model"]), str(folder), "--out", str(tmp_path / "o"), "--sigma", "0", "--quiet"])
    assert code == 1 and "broken.png" in capsys.readouterr().err
    for i in range(3):
        mask = np.asarray(Image.open(tmp_path / "o" / "masks" / f"p{i}.png")) > 0
        assert mask.shape == (100, 120)
        assert mask[20:50, 20 * i + 5:20 * i + 35].mean() > 0.9 and mask[70:, :].mean() < 0.05
        assert (tmp_path / "o" / "overlays" / f"p{i}.png").is_file()
    report = json.loads((tmp_path / "o" / "patches.json").read_text())
    assert len(report["images"]) == 3


def test_large_plain_images_are_segmented_like_slides(world, tmp_path, capsys):
    img = world["image"][:400, :500]
    Image.fromarray(img).save(tmp_path / "scan.png", dpi=(25400 / 0.25, 25400 / 0.25))  # 0.25 µm/px
    Image.fromarray(img).save(tmp_path / "photo.jpg", quality=95)  # no resolution
    code = main(["predict", str(world["model"]), str(tmp_path / "scan.png"), str(tmp_path / "photo.jpg"),
                 "--out", str(tmp_path / "o"), "--patch-max", "300", "--quiet"])
    assert code == 1 and "photo.jpg: no resolution" in capsys.readouterr().err
    s = json.loads((tmp_path / "o" / "scan" / "summary.json").read_text())
    assert s["reader"] == "image" and s["mpp"] == pytest.approx([0.25, 0.25], rel=1e-3) and s["polygons"] >= 1
    assert openslide.OpenSlide(str(tmp_path / "o" / "scan" / "probability.tif")).level_dimensions[0] == (63, 50)


def test_model_mpp_comes_from_the_model_file_or_the_option(world, tmp_path):
    model = dark_detector_model(tmp_path / "m1.safetensors", input_size=64, mpp=1.0)
    rep = predict(model, [world["slide"]], tmp_path / "a", PredictSettings(workers=0, batch_size=32), progress=False,
                  echo=lambda *a: None)
    s = rep.slides[0]
    assert s["model_mpp"] == 1.0 and s["model_mpp_source"] == "model file" and s["read_level"] == 2
    assert s["output_mpp"] == [4.0, 4.0]
    rep = predict(model, [world["slide"]], tmp_path / "b", PredictSettings(workers=0, model_mpp=0.25, batch_size=32),
                  progress=False, echo=lambda *a: None)
    assert rep.slides[0]["model_mpp"] == 0.25 and rep.slides[0]["read_level"] == 0


def test_user_errors_stop_before_any_work(world, tmp_path):
    assert main(["predict", str(tmp_path / "missing.safetensors"), str(world["slide"]), "--out", str(tmp_path)]) == 2
    assert main(["predict", str(world["model"]), str(world["slide"]), "--out", str(tmp_path / "o"),
                 "--overlap", "7"]) == 2
    (tmp_path / "x").mkdir()
    assert main(["predict", str(world["model"]), str(tmp_path / "x"), "--out", str(tmp_path / "o")]) == 2


def test_a_previous_config_reproduces_the_settings(world, predicted, tmp_path):
    cfg = predicted.parent / "predict_config.yaml"
    assert main(["predict", str(world["model"]), str(world["slide"]), "--out", str(tmp_path / "again"),
                 "--config", str(cfg), "--quiet"]) == 0
    again = yaml.safe_load((tmp_path / "again" / "predict_config.yaml").read_text())
    assert again["settings"] == yaml.safe_load(cfg.read_text())["settings"]
    first = json.loads((predicted / "summary.json").read_text())
    second = json.loads((tmp_path / "again" / "case1" / "summary.json").read_text())
    assert second["tumour_area_mm2"] == first["tumour_area_mm2"] and second["polygons"] == first["polygons"]


def test_predict_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage: ikdmil predict" in text and "--model-mpp" in text and "--mpp" in text
