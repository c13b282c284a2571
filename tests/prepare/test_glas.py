"""GlaS preparer: both source layouts, the patient-wise validation split, errors, and the real data."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fakes.glas import make_fake_glas_official, make_fake_glas_shared
from PIL import Image

from ikdmil.data.manifest import load_samples
from ikdmil.errors import IkdmilError
from ikdmil.prepare.glas import prepare_glas


def _patients(records: list[dict]) -> dict[str, str]:
    return {r["name"]: str(r["patient"]) for r in records}


def _check_prepared(out: Path, records: list[dict]) -> list:
    """Checks shared by both layouts; returns the loaded samples."""
    manifest = out / "manifest.csv"
    assert manifest.is_file()
    samples = load_samples(out)
    assert len(samples) == len(records)
    by_name = {r["name"]: r for r in records}
    patient_of = _patients(records)

    # counts per split and class
    got = Counter((s.split, s.label) for s in samples)
    want_test = Counter(r["grade"] for r in records if r["split"] != "train")
    want_train = Counter(r["grade"] for r in records if r["split"] == "train")
    assert got[("test", 1)] == want_test["malignant"] and got[("test", 0)] == want_test["benign"]
    assert got[("train", 1)] + got[("val", 1)] == want_train["malignant"]
    assert got[("train", 0)] + got[("val", 0)] == want_train["benign"]

    assert {s.mpp for s in samples} == {0.62}  # GlaS is 20x: training derives the model's µm/px from it
    for s in samples:
        r = by_name[s.image.stem]
        assert s.label == (1 if r["grade"] == "malignant" else 0)
        assert (s.split == "test") == (r["split"] != "train")
        assert s.image.parent.name == ("pos" if s.label else "neg")
        assert s.mask is not None and s.mask.parent.name == "masks" and s.mask.stem == s.image.stem
        mask = np.asarray(Image.open(s.mask))
        assert set(np.unique(mask).tolist()) <= {0, 255}
        assert mask.shape == Image.open(s.image).size[::-1]
        if s.label == 1:
            assert np.array_equal(mask > 0, r["label"] > 0)
        else:
            assert not mask.any()

    train_patients = {patient_of[s.image.stem] for s in samples if s.split == "train"}
    val_patients = {patient_of[s.image.stem] for s in samples if s.split == "val"}
    assert val_patients and not (train_patients & val_patients)
    assert {s.label for s in samples if s.split == "val"} == {0, 1}
    assert {s.label for s in samples if s.split == "train"} == {0, 1}

    summary = json.loads((out / "glas_summary.json").read_text())
    for split in ("train", "val", "test"):
        assert summary["counts"][split]["pos"] == got[(split, 1)]
        assert summary["counts"][split]["neg"] == got[(split, 0)]
    assert set(summary["patients"]["val"]) == val_patients
    assert not list(out.parent.glob(f"{out.name}.tmp-*"))
    return samples


def _split_of(samples) -> dict[str, str]:
    return {s.image.stem: s.split for s in samples}


def test_official_layout(tmp_path):
    records = make_fake_glas_official(tmp_path / "src")
    manifest = prepare_glas(tmp_path / "src", tmp_path / "out", progress=False)
    assert manifest == (tmp_path / "out" / "manifest.csv").absolute()
    samples = _check_prepared(tmp_path / "out", records)
    assert all(s.image.suffix == ".png" for s in samples)  # BMP converted
    # the PNG holds exactly the BMP's pixels
    s = samples[0]
    bmp = tmp_path / "src" / f"{s.image.stem}.bmp"
    assert np.array_equal(np.asarray(Image.open(s.image)), np.asarray(Image.open(bmp)))
    summary = json.loads((tmp_path / "out" / "glas_summary.json").read_text())
    assert summary["layout"] == "official"

    # deterministic by seed; preparing again over a previous preparation replaces it
    prepare_glas(tmp_path / "src", tmp_path / "out", progress=False)
    assert _split_of(load_samples(tmp_path / "out")) == _split_of(samples)
    prepare_glas(tmp_path / "src", tmp_path / "again", progress=False)
    assert _split_of(load_samples(tmp_path / "again")) == _split_of(samples)


def test_seed_changes_split_on_larger_set(tmp_path):
    records = make_fake_glas_official(tmp_path / "src", n_train=24, n_testA=2, n_testB=2, size=(16, 12))
    splits = set()
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        prepare_glas(tmp_path / "src", out, seed=seed, progress=False)
        _check_prepared(out, records)
        splits.add(tuple(sorted(_split_of(load_samples(out)).items())))
    assert len(splits) > 1


def test_shared_layout_copies_jpeg_bytes(tmp_path):
    records = make_fake_glas_shared(tmp_path / "src")
    prepare_glas(tmp_path / "src", tmp_path / "out", progress=False)
    samples = _check_prepared(tmp_path / "out", records)
    for s in samples:
        assert s.image.suffix == ".jpg"
        assert s.image.read_bytes() == (tmp_path / "src" / "images" / s.image.name).read_bytes()
    assert json.loads((tmp_path / "out" / "glas_summary.json").read_text())["layout"] == "shared"
    prepare_glas(tmp_path / "src", tmp_path / "out2", progress=False)
    assert _split_of(load_samples(tmp_path / "out2")) == _split_of(samples)


def test_tolerant_grade_csv(tmp_path):
    records = make_fake_glas_official(tmp_path / "src")
    csv_path = tmp_path / "src" / "Grade.csv"
    lines = csv_path.read_text().splitlines()
    lines[0] = "Name,Patient ID , Grade (GlaS),grade (Sirinukunwattana et al. 2015)"
    lines[1:] = [line.replace("malignant", " Malignant ").replace("benign", "BENIGN") for line in lines[1:]]
    csv_path.write_text("\ufeff" + "\r\n".join(lines) + "\r\n\r\n")
    prepare_glas(tmp_path / "src", tmp_path / "out", progress=False)
    _check_prepared(tmp_path / "out", records)


def _expect_error(src, out, *fragments, **kwargs):
    with pytest.raises(IkdmilError) as info:
        prepare_glas(src, out, progress=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message
    assert not Path(out).exists()
    assert not list(Path(out).parent.glob(f"{Path(out).name}.tmp-*"))
    return message


def test_missing_src(tmp_path):
    _expect_error(tmp_path / "nope", tmp_path / "out", tmp_path / "nope")


def test_unrecognised_folder(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    message = _expect_error(tmp_path / "src", tmp_path / "out", tmp_path / "src")
    assert "Grade.csv" in message and "index.csv" in message


def test_mask_size_mismatch_official(tmp_path):
    make_fake_glas_official(tmp_path / "src")
    bad = tmp_path / "src" / "testA_2_anno.bmp"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)
    _expect_error(tmp_path / "src", tmp_path / "out", bad)


def test_mask_size_mismatch_shared(tmp_path):
    make_fake_glas_shared(tmp_path / "src")
    bad = tmp_path / "src" / "labels" / "train_3.png"
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(bad)
    _expect_error(tmp_path / "src", tmp_path / "out", bad)


def test_unknown_grade(tmp_path):
    make_fake_glas_official(tmp_path / "src")
    csv_path = tmp_path / "src" / "Grade.csv"
    csv_path.write_text(csv_path.read_text().replace("train_3, 2, benign", "train_3, 2, intermediate"))
    _expect_error(tmp_path / "src", tmp_path / "out", csv_path, "intermediate")


def test_unknown_grade_shared(tmp_path):
    make_fake_glas_shared(tmp_path / "src")
    csv_path = tmp_path / "src" / "index.csv"
    csv_path.write_text(csv_path.read_text().replace("testB_1,testB,malignant", "testB_1,testB,cancer"))
    _expect_error(tmp_path / "src", tmp_path / "out", csv_path, "cancer")


def test_image_without_annotation(tmp_path):
    make_fake_glas_official(tmp_path / "src")
    (tmp_path / "src" / "train_5_anno.bmp").unlink()
    _expect_error(tmp_path / "src", tmp_path / "out", tmp_path / "src" / "train_5.bmp", "train_5_anno.bmp")
    make_fake_glas_shared(tmp_path / "src2")
    (tmp_path / "src2" / "labels" / "testA_1.png").unlink()
    _expect_error(tmp_path / "src2", tmp_path / "out", tmp_path / "src2" / "images" / "testA_1.jpg")


def test_listed_image_missing(tmp_path):
    make_fake_glas_official(tmp_path / "src")
    (tmp_path / "src" / "testB_2.bmp").unlink()
    _expect_error(tmp_path / "src", tmp_path / "out", tmp_path / "src" / "testB_2.bmp")
    make_fake_glas_shared(tmp_path / "src2")
    (tmp_path / "src2" / "images" / "train_1.jpg").unlink()
    _expect_error(tmp_path / "src2", tmp_path / "out", "train_1.jpg", "index.csv")


def test_image_not_in_csv(tmp_path):
    make_fake_glas_official(tmp_path / "src")
    csv_path = tmp_path / "src" / "Grade.csv"
    csv_path.write_text("\n".join(line for line in csv_path.read_text().splitlines()
                                  if not line.startswith("train_2,")) + "\n")
    _expect_error(tmp_path / "src", tmp_path / "out", tmp_path / "src" / "train_2.bmp")


def test_refuses_foreign_nonempty_out(tmp_path):
    make_fake_glas_official(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(IkdmilError, match="not empty"):
        prepare_glas(tmp_path / "src", out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    assert not list(tmp_path.glob("out.tmp-*"))
    (out / "precious.txt").unlink()  # an empty folder is fine
    prepare_glas(tmp_path / "src", out, progress=False)
    assert (out / "manifest.csv").is_file()


def test_failed_rerun_keeps_previous_preparation(tmp_path):
    make_fake_glas_official(tmp_path / "src")
    out = tmp_path / "out"
    prepare_glas(tmp_path / "src", out, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "src" / "testB_1_anno.bmp")
    with pytest.raises(IkdmilError, match="testB_1_anno.bmp"):
        prepare_glas(tmp_path / "src", out, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not list(tmp_path.glob("out.tmp-*"))


def test_bad_val_fraction(tmp_path):
    make_fake_glas_official(tmp_path / "src")
    _expect_error(tmp_path / "src", tmp_path / "out", "val_fraction", val_fraction=1.0)


def test_val_fraction_zero(tmp_path):
    records = make_fake_glas_shared(tmp_path / "src")
    prepare_glas(tmp_path / "src", tmp_path / "out", val_fraction=0, progress=False)
    samples = load_samples(tmp_path / "out")
    assert len(samples) == len(records)
    assert not any(s.split == "val" for s in samples)


def test_real_glas(glas_dir, tmp_path):
    out = tmp_path / "glas"
    prepare_glas(glas_dir, out, progress=False)
    samples = load_samples(out)
    counts = Counter((s.split, s.label) for s in samples)
    assert counts[("test", 1)] == 43 and counts[("test", 0)] == 37
    assert counts[("train", 1)] + counts[("val", 1)] == 48
    assert counts[("train", 0)] + counts[("val", 0)] == 37
    assert counts[("val", 1)] > 0 and counts[("val", 0)] > 0
    assert 8 <= counts[("val", 1)] + counts[("val", 0)] <= 26  # about 20 % of 85

    with open(glas_dir / "index.csv", newline="") as fh:
        patient = {row["name"]: row["patient_id"] for row in csv.DictReader(fh)}
    train_p = {patient[s.image.stem] for s in samples if s.split == "train"}
    val_p = {patient[s.image.stem] for s in samples if s.split == "val"}
    assert not (train_p & val_p)
    assert len(train_p | val_p) == 15

    for s in samples:
        with Image.open(s.image) as img, Image.open(s.mask) as mask:
            assert img.size == mask.size
        if s.label == 0:
            assert not np.asarray(Image.open(s.mask)).any()
    s = next(s for s in samples if s.label == 1)
    label = np.asarray(Image.open(glas_dir / "labels" / f"{s.image.stem}.png"))
    assert np.array_equal(np.asarray(Image.open(s.mask)) > 0, label > 0)
    assert s.image.read_bytes() == (glas_dir / "images" / s.image.name).read_bytes()
