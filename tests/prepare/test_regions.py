"""`ikdmil prepare regions` on fake slides with fake QuPath exports / region CSVs (tests/fakes/qupath.py)."""

import json
from collections import Counter

import numpy as np
import pytest
from fakes.qupath import (
    LARGE_TUMOUR_BOX,
    NORMAL_BOX,
    SLIDE_SIZE,
    TISSUE,
    TUMOUR_BOX,
    make_fake_region_slides,
    qupath_feature,
    write_exports,
    write_qupath_geojson,
    write_region_csv,
)
from fakes.slides import painted_slide, write_slide
from PIL import Image
from shapely.geometry import Polygon, box

from ikdmil.cli import main
from ikdmil.data.manifest import load_samples
from ikdmil.prepare.region_labels import Region
from ikdmil.prepare.regions import RegionsOptions, plan_region

# slides are 1 µm/px: at --mpp 2 a slide is 256 x 192 px, TUMOUR_BOX 40 x 30 (whole), LARGE_TUMOUR_BOX 80 x 48
# (longer than --max-size 64: 3 x 2 tiles of 32), NORMAL_BOX 64 x 64 (2 x 2 tiles)
ARGS = ["--mpp", "2", "--patch-size", "32", "--max-size", "64", "--min-size", "16", "--max-tiles-per-slide", "5",
        "--quiet"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_region_slides(tmp_path_factory.mktemp("regions") / "src")


@pytest.fixture(scope="module")
def prepared(fake, tmp_path_factory):
    labels = write_exports(tmp_path_factory.mktemp("exports") / "qupath", fake["regions"])
    out = tmp_path_factory.mktemp("regions_out") / "data"
    args = ["prepare", "regions", str(fake["slides"]), str(labels), str(out), *ARGS,
            "--normal-slides", str(fake["normal_slides"])]
    assert main(args) == 0
    return out


def _slide(sample) -> str:
    return sample.image.stem.split("_")[0]


def test_regions_become_images_at_mpp_labelled_by_their_region(prepared):
    samples = load_samples(prepared)
    per_slide = Counter(_slide(s) for s in samples)
    # t1: its small tumour whole + 6 tiles of the large one + 4 normal tiles; t2, t3: 1 + 4; n1, n2: 4;
    # n3 (--normal-slides): 5 tiles of its tissue (--max-tiles-per-slide)
    assert per_slide == {"t1": 11, "t2": 5, "t3": 5, "n1": 4, "n2": 4, "n3": 5}
    for s in samples:
        assert s.mpp == 2.0 and s.mask is None
        rgb = np.asarray(Image.open(s.image).convert("RGB")).astype(float)
        whole = "_t" not in s.image.stem and s.label == 1
        assert rgb.shape[:2] == ((30, 40) if whole else (32, 32)), s.image.name
        # the pixels come from where the region was drawn: tumour paint is purple, tissue pink, glass white
        if s.label == 1:
            assert rgb[..., 0].mean() < 130, s.image.name
        else:
            assert rgb[..., 0].mean() > 200, s.image.name
    summary = json.loads((prepared / "regions_summary.json").read_text())
    assert summary["tiling"]["tumour_regions_tiled"] == 1 and summary["tiling"]["tumour_tiles_positive"] == 6
    assert summary["source"]["skipped_objects"] == {"detections": 1, "points_or_lines": 1}
    assert summary["source"]["regions_skipped_by_class"] == 1  # the Ignore* area
    assert summary["mpp"] == 2.0 and set(map(tuple, summary["slide_mpp"].values())) == {(1.0, 1.0)}


def test_split_by_slide_with_tumour_slides_in_every_split(prepared):
    samples = load_samples(prepared)
    summary = json.loads((prepared / "regions_summary.json").read_text())
    slides = summary["slides"]
    assert sorted(slides["train"] + slides["val"] + slides["test"]) == ["n1", "n2", "n3", "t1", "t2", "t3"]
    for names in slides.values():
        assert any(n.startswith("t") for n in names) and any(n.startswith("n") for n in names)
    for s in samples:
        assert s.split in slides and _slide(s) in slides[s.split]  # every image in its slide's split
    for split in ("train", "val"):
        assert {s.label for s in samples if s.split == split} == {0, 1}


def test_boxes_to_qupath_polygons_with_no_resolution_given_by_hand(fake, prepared, tmp_path, tiny_config,
                                                                     tiny_backbone):
    """Issue 11's path: QuPath boxes -> prepare regions -> train -> predict a slide -> GeoJSON, and no step
    is told a resolution except prepare's --mpp (the slides carry theirs)."""
    from ikdmil.engine.pipeline import Pipeline
    from ikdmil.inference import PredictSettings, predict
    from ikdmil.models.checkpoint import read_model_meta

    cfg = tiny_config(prepared, tmp_path / "run", teacher_epochs=1, fusion_epochs=0, distill_epochs=1,
                      backbone=tiny_backbone)
    results = Pipeline(cfg, progress=False).run()
    model = tmp_path / "run" / "model.safetensors"
    assert "f1" in results["models"]["student"]["test"]
    model_mpp = read_model_meta(model)["mpp"]
    assert model_mpp >= 2.0  # the prepared images are 2 µm/px, rescaled down (never up) to the model's input
    report = predict(model, [fake["slides"] / "t1.tif"], tmp_path / "pred", PredictSettings(workers=0),
                     progress=False, echo=lambda *a: None)
    summary = report.slides[0]
    assert summary["model_mpp"] == pytest.approx(model_mpp) and summary["model_mpp_source"] == "model file"
    geojson = json.loads((tmp_path / "pred" / "t1" / "tumour.geojson").read_text())
    assert geojson["type"] == "FeatureCollection"


def _csv_rows(regions: dict) -> list:
    text = {"Tumor": ["tumour", "1"], "Normal": ["normal", "0"]}
    return [(f"{slide}.tif" if slide == "t3" else slide, b, text[c][i % 2])
            for i, (slide, boxes) in enumerate(regions.items()) for b, c in boxes]


def test_csv_labels_give_the_same_images_and_a_rerun_resumes(fake, prepared, tmp_path, capsys):
    labels = write_region_csv(tmp_path / "regions.csv", _csv_rows(fake["regions"]))
    normal = tmp_path / "normal.csv"
    normal.write_text("slide,comment\nn3.tif,no tumour\n")
    out = tmp_path / "data"
    args = ["prepare", "regions", str(fake["slides"]), str(labels), str(out), *ARGS[:-1], "--normal-slides",
            str(normal)]
    assert main(args) == 0
    assert "1 Tumor region(s) longer than --max-size 64 px were tiled: 6 tile(s)" in capsys.readouterr().err
    got = {(s.image.relative_to(out).as_posix(), s.label) for s in load_samples(out)}
    assert got == {(s.image.relative_to(prepared).as_posix(), s.label) for s in load_samples(prepared)}
    manifest = (out / "manifest.csv").read_text()
    first = out / sorted(got)[0][0]
    first.unlink()
    assert main(args + ["--quiet"]) == 0 and first.is_file()  # redone; other slides skipped
    assert (out / "manifest.csv").read_text() == manifest
    rows = _csv_rows(fake["regions"])
    write_region_csv(labels, rows[:-1])  # labels edited: not mixed into the old output
    assert main(args + ["--quiet"]) == 2
    assert "labels_digest" in capsys.readouterr().err


def _opts(**kw) -> RegionsOptions:
    return RegionsOptions(**{"patch_size": 32, "max_size": 64, "min_size": 16, **kw}).validate()


# an L: the 128 x 128 box without its top-right 64 x 56 corner. With 32 px tiles (4 x 4), the two top-right
# tiles lie outside it and the two below them are 8/32 = 25 % inside.
L_SHAPE = Polygon([(0, 0), (64, 0), (64, 56), (128, 56), (128, 128), (0, 128)])


def test_a_large_tumour_region_is_tiled_and_tiles_are_positive_by_overlap():
    stats = Counter()
    pieces = plan_region(Region("s", 1, "Tumor", L_SHAPE, None, "", 1), (1.0, 1.0), _opts(), stats=stats)
    assert len(pieces) == 12 and all(p.label == 1 and p.size == (32, 32) for p in pieces)
    assert min(p.inside for p in pieces) == 1.0
    assert stats == {"tumour_regions_tiled": 1, "tumour_tiles_positive": 12, "tumour_tiles_below_overlap": 4}
    loose = plan_region(Region("s", 1, "Tumor", L_SHAPE, None, "", 1), (1.0, 1.0), _opts(min_tumour_overlap=0.2))
    assert len(loose) == 14 and sorted(p.inside for p in loose)[:2] == [0.25, 0.25]


def test_a_tumour_region_up_to_max_size_is_one_image_whatever_its_shape():
    sliver = Polygon([(0, 0), (60, 52), (60, 60), (52, 60)])  # a thin diagonal band: ~12 % of its box
    pieces = plan_region(Region("s", 1, "Tumor", sliver, None, "", 1), (1.0, 1.0), _opts())
    assert len(pieces) == 1 and pieces[0].label == 1 and pieces[0].size == (60, 60) and pieces[0].inside < 0.2
    # the L at 2 level-0 px per image px is 64 px long: kept whole too
    pieces = plan_region(Region("s", 1, "Tumor", L_SHAPE, None, "", 1), (2.0, 2.0), _opts())
    assert [(p.size, p.box) for p in pieces] == [((64, 64), (0.0, 0.0, 128.0, 128.0))]


def test_normal_tiles_lie_inside_their_region_and_off_tumour():
    stats = Counter()
    tumour = box(100, 100, 110, 110)  # inside the L's bottom-right tile
    pieces = plan_region(Region("s", 1, "Normal", L_SHAPE, None, "", 0), (1.0, 1.0), _opts(), tumour, stats)
    assert len(pieces) == 11 and all(p.label == 0 and p.inside == 1.0 for p in pieces)
    assert stats == {"normal_tiles_outside_outline": 4, "normal_tiles_touching_tumour": 1}
    assert not any(p.box[0] == 96 and p.box[1] == 96 for p in pieces)
    # a small Normal region is tiled as well: never larger than a tile, always inside
    small = plan_region(Region("s", 1, "Normal", box(0, 0, 40, 20), None, "", 0), (1.0, 1.0), _opts())
    assert [(p.size, p.box) for p in small] == [((32, 20), (0.0, 0.0, 32.0, 20.0)), ((32, 20), (8.0, 0.0, 32.0, 20.0))]


# ------------------------------------------------------------------------------------------------ errors


def _run(fake, labels, out, *extra):
    return main(["prepare", "regions", str(fake["slides"]), str(labels), str(out), *ARGS, *extra])


def test_unknown_class_names_are_listed_with_the_fix(fake, tmp_path, capsys):
    labels = tmp_path / "labels"
    write_qupath_geojson(labels / "t1.geojson", [qupath_feature(TUMOUR_BOX, "Tumor"),
                                                 qupath_feature(NORMAL_BOX, "Stroma")])
    write_qupath_geojson(labels / "n1.geojson", [qupath_feature(NORMAL_BOX, "Necrosis"),
                                                 qupath_feature(LARGE_TUMOUR_BOX, None)])
    assert _run(fake, labels, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("ikdmil: error:") == 1 and str(labels) in err
    for name in ("'Necrosis' (1 region(s))", "'Stroma'", "'Unclassified'", "--classes"):
        assert name in err
    assert _run(fake, labels, tmp_path / "o", "--classes", "stroma=0,Necrosis=skip,Unclassified=skip") == 0
    counts = Counter(s.label for s in load_samples(tmp_path / "o"))
    assert counts == {0: 4, 1: 1}  # t1's Stroma box tiled as negatives; n1 has nothing left


def _slide_without_mpp(tmp_path):
    img, _ = painted_slide(np.random.default_rng(0), SLIDE_SIZE, [TISSUE], [])
    write_slide(tmp_path / "slides" / "bare.tif", img, mpp=None, tile=64, levels=1)
    return {"slides": tmp_path / "slides"}


ERRORS = {
    "outside": (lambda d: write_qupath_geojson(d / "t1.geojson", [qupath_feature((480, 300, 100, 50), "Tumor")]),
                ["t1.geojson feature 1", "region 1 (Tumor, x 480-580, y 300-350 px)", "512 x 384 px", "t1.tif"]),
    "missing slide": (lambda d: write_qupath_geojson(d / "t9.geojson", [qupath_feature(TUMOUR_BOX, "Tumor")]),
                      ["t9.geojson", "slide(s) t9", "remove their labels"]),
    "not json": (lambda d: (d / "t1.geojson").write_text("{\"type\": \"FeatureCollection\", "),
                 ["t1.geojson: not a readable GeoJSON file", "export the annotations from QuPath"]),
    "not geojson": (lambda d: (d / "t1.geojson").write_text("{\"features\": 3}"),
                    ["t1.geojson: not GeoJSON"]),
    "bad polygon": (lambda d: write_qupath_geojson(d / "t1.geojson", [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 2]]]}, "properties": {}}]),
        ["t1.geojson: malformed Polygon (feature 1)", "re-export"]),
    "csv column": (lambda d: (d / "r.csv").write_text("slide,x,y,w,label\nt1,1,2,3,Tumor\n"),
                   ["r.csv: lacks column(s) h", "slide,x,y,w,h,label"]),
    "csv number": (lambda d: (d / "r.csv").write_text("slide,x,y,w,h,label\nt1,1,2,three,4,Tumor\n"),
                   ["r.csv:2: w must be a number", "got 'three'"]),
    "csv size": (lambda d: (d / "r.csv").write_text("slide,x,y,w,h,label\nt1,1,2,0,4,Tumor\n"),
                 ["r.csv:2: w and h must be positive"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_labels_get_one_line_naming_the_file_and_the_fix(fake, tmp_path, capsys, case):
    write, expected = ERRORS[case]
    labels = tmp_path / "labels"
    labels.mkdir()
    write(labels)
    target = labels / "r.csv" if (labels / "r.csv").exists() else labels
    assert _run(fake, target, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.count("ikdmil: error:") == 1 and "Traceback" not in err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_bad_normal_slides_and_resolution_and_options(fake, tmp_path, capsys):
    labels = write_qupath_geojson(tmp_path / "t1.geojson", [qupath_feature(TUMOUR_BOX, "Tumor")])
    lst = tmp_path / "normal.txt"
    lst.write_text("n3\nn7\n")
    assert _run(fake, labels, tmp_path / "o", "--normal-slides", str(lst)) == 2
    assert "normal.txt: names slide(s) n7" in capsys.readouterr().err
    lst.write_text("t1\n")
    assert _run(fake, labels, tmp_path / "o", "--normal-slides", str(lst)) == 2
    assert "lists t1 as normal, but its labels have Tumor regions" in capsys.readouterr().err
    assert _run(fake, labels, tmp_path / "o", "--classes", "Tumor:1") == 2
    assert "is not NAME=1, NAME=0 or NAME=skip" in capsys.readouterr().err
    bare = _slide_without_mpp(tmp_path)
    bare_labels = write_qupath_geojson(tmp_path / "bare.geojson", [qupath_feature(NORMAL_BOX, "Normal")])
    assert _run(bare, bare_labels, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "bare.tif: no resolution" in err and "--slide-mpp" in err
    assert _run(bare, bare_labels, tmp_path / "o", "--slide-mpp", "1") == 0
    assert {s.mpp for s in load_samples(tmp_path / "o")} == {2.0}


def test_regions_that_give_no_image_and_upsampling_are_warned_about(fake, tmp_path, capsys):
    labels = write_qupath_geojson(tmp_path / "t1.geojson", [qupath_feature(TUMOUR_BOX, "Tumor"),
                                                             qupath_feature((4, 4, 10, 10), "Normal")])
    assert _run(fake, labels, tmp_path / "o") == 0
    err = capsys.readouterr().err
    assert "1 region(s) gave no image at all" in err and "1 (too small)" in err and "upsampled" not in err
    assert main(["prepare", "regions", str(fake["slides"]), str(labels), str(tmp_path / "o2"), "--mpp", "0.5",
                 "--patch-size", "32", "--max-size", "256", "--quiet"]) == 0
    assert "t1.tif: scanned at 1 µm/px, coarser than --mpp 0.5: its images are upsampled" in capsys.readouterr().err
