"""`ikdmil prepare camelyon16` on a fake Camelyon16 tree (tiled TIFF slides, ASAP XML, reference.csv)."""

import json
import shutil

import numpy as np
import pytest
from fakes.slides import make_fake_camelyon16
from PIL import Image

from ikdmil.cli import main
from ikdmil.data.manifest import load_samples
from ikdmil.prepare.camelyon16 import Camelyon16Options, _choose, _Slide

# --patch-size 32 at level 1 (2x downsample) = one 64 px cell of the fake slides
ARGS = ["--patch-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_camelyon16(tmp_path_factory.mktemp("c16") / "src")


@pytest.fixture(scope="module")
def prepared(fake, tmp_path_factory):
    out = tmp_path_factory.mktemp("c16out") / "data"
    assert main(["prepare", "camelyon16", str(fake["slides"]), str(fake["annotations"]), str(out), *ARGS]) == 0
    return out


def test_counts_splits_and_labels(prepared):
    summary = json.loads((prepared / "camelyon16_summary.json").read_text())
    slides = summary["slides"]
    assert slides["test"] == ["test_001", "test_002"]
    assert set(slides["train"]) | set(slides["val"]) == {"tumor_001", "tumor_002", "tumor_003", "normal_001",
                                                         "normal_002", "normal_003"}
    assert not set(slides["train"]) & set(slides["val"])
    for split in ("train", "val"):  # val carved by slide, with both classes
        assert any(n.startswith("tumor") for n in slides[split]) and any(n.startswith("normal") for n in slides[split])
    # test_001 from reference.csv
    assert summary["tumour_slides"] == ["test_001", "tumor_001", "tumor_002", "tumor_003"]
    counts = summary["counts"]
    for split in ("train", "val", "test"):
        # 6 tumour cells per tumour slide; as many negatives from the split's normal slides
        n_tumour_slides = sum(1 for n in slides[split] if n.startswith(("tumor", "test_001")))
        assert counts[split]["pos"] == 6 * n_tumour_slides
        assert counts[split]["neg"] == counts[split]["pos"]
    assert set(summary["patch_mpp"].values()) == {0.5}  # level 1 of 0.25 µm/px slides
    hist = summary["tumour_fraction_histogram"]
    assert sum(hist["train"]) == counts["train"]["pos"]
    assert hist["train"][-1] == counts["train"]["pos"] * 5 // 6  # the patch with the exclusion hole is 75 % tumour

    samples = load_samples(prepared)
    assert len(samples) == sum(c["total"] for c in counts.values())
    assert {s.mpp for s in samples} == {0.5}  # the manifest carries the patches' µm/px (0.25 x level 1's 2x)
    split_of = {}
    for s in samples:
        slide = s.image.stem.rsplit("_x", 1)[0]
        assert split_of.setdefault(slide, s.split) == s.split  # every slide in one split
        if s.label == 0:
            assert slide.startswith(("normal", "test_002")) and s.mask is None
        else:
            assert slide.startswith(("tumor", "test_001")) and s.mask is not None and s.mask.is_file()
        assert Image.open(s.image).size == (32, 32)


def test_masks_follow_the_annotation_and_its_exclusion_hole(prepared, fake):
    samples = [s for s in load_samples(prepared) if s.label == 1]
    x, y, w, h = fake["tumour"]["tumor_002"]
    ex = fake["exclusion"]["tumor_002"]
    for s in samples:
        if not s.image.stem.startswith("tumor_002"):
            continue
        px, py = (int(v[1:]) for v in s.image.stem.split("_")[2:4])
        mask = np.asarray(Image.open(s.mask)) > 0
        assert x <= px < x + w and y <= py < y + h
        if px <= ex[0] < px + 64 and py <= ex[1] < py + 64:
            assert mask.mean() == pytest.approx(0.75, abs=0.02)  # a 32 px level-0 hole = 16 px at level 1
            assert not mask[8:24, 8:24].any()
        else:
            assert mask.all()


def test_rerun_resumes_and_other_options_are_refused(prepared, fake, capsys):
    manifest = (prepared / "manifest.csv").read_text()
    done = prepared / ".ikdmil-prepare" / "done" / "tumor_002.json"
    records = json.loads(done.read_text())
    done.unlink()
    (prepared / records[0]["image"]).unlink()
    assert main(["prepare", "camelyon16", str(fake["slides"]), str(fake["annotations"]), str(prepared), *ARGS]) == 0
    assert (prepared / records[0]["image"]).is_file() and done.is_file()
    assert (prepared / "manifest.csv").read_text() == manifest
    code = main(["prepare", "camelyon16", str(fake["slides"]), str(fake["annotations"]), str(prepared),
                 "--patch-size", "16", "--quiet"])
    assert code == 2 and "patch_size: 32 -> 16" in capsys.readouterr().err


def test_a_tumour_slide_without_annotation_is_an_error(fake, tmp_path, capsys):
    annos = tmp_path / "annos"
    shutil.copytree(fake["annotations"], annos)
    (annos / "tumor_003.xml").unlink()
    code = main(["prepare", "camelyon16", str(fake["slides"]), str(annos), str(tmp_path / "o"), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "tumor_003" in err and "--exclude tumor_003" in err
    code = main(["prepare", "camelyon16", str(fake["slides"]), str(annos), str(tmp_path / "o"), *ARGS,
                 "--exclude", "tumor_003"])
    assert code == 0


def test_background_rules_train_versus_test_positives():
    slides = [_Slide("tumor_001", None, "tumor", True, None, "train"),
              _Slide("test_001", None, "test", True, None, "test"),
              _Slide("normal_001", None, "normal", False, None, "train"),
              _Slide("test_002", None, "test", False, None, "test")]
    cands = [[0, 0, 0.85, 0.5], [1, 0, 0.5, 0.5], [2, 0, 0.95, 0.5], [3, 0, 0.1, 0.0]]
    neg = [[i, 1, bg, 0.0] for i, bg in enumerate((0.1, 0.85, 0.2, 0.3))]
    scans = {"tumor_001": {"candidates": cands}, "test_001": {"candidates": cands},
             "normal_001": {"candidates": neg}, "test_002": {"candidates": neg}}
    chosen = _choose(slides, scans, Camelyon16Options())
    assert [c[0] for c in chosen["tumor_001"]] == [1]  # 85 % background: dropped in train
    assert [c[0] for c in chosen["test_001"]] == [0, 1]  # ... kept in test (<= 90 %); 95 % dropped
    assert len(chosen["normal_001"]) == 1 and len(chosen["test_002"]) == 2
    assert all(c[2] == 0 and c[3] <= 0.8 for c in chosen["normal_001"] + chosen["test_002"])
