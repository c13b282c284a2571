"""Resolution end to end: a prepared folder (mpp in its manifest) -> training prints and stores the
model's µm/px -> evaluate and predict use it with no resolution flag."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from fakes.glas import make_fake_glas_official
from fakes.slides import painted_slide, write_slide

from ikdmil.cli import main
from ikdmil.models.checkpoint import read_model_meta


def test_train_on_prepared_glas_then_predict_a_slide_without_any_resolution_flag(tmp_path, caplog):
    make_fake_glas_official(tmp_path / "src", size=(72, 48))  # non-square, like GlaS's 775 x 522
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "glas", str(tmp_path / "src"), str(data), "--quiet"]) == 0
    caplog.set_level(logging.INFO, logger="ikdmil")
    assert main(["train", str(data), "--out", str(run), "--input-size", "32", "--batch-size", "4",
                 "--pretrained", "none", "--teacher-epochs", "1", "--fusion-epochs", "0", "--eval-sigma", "0",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = re.findall(r"model scale: ([0-9.]+) µm/px", caplog.text)
    assert len(printed) == 1  # one log line
    meta = read_model_meta(run / "teacher.safetensors")
    assert meta["mpp"] == pytest.approx(0.62 * 48 / 32) == pytest.approx(float(printed[0]))  # 0.93 µm/px

    assert main(["evaluate", str(run / "teacher.safetensors"), str(data), "--split", "test",
                 "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["scale"]["mpp"] == meta["mpp"] and result["summary"]["n"] == 6  # every test image, whole

    rng = np.random.default_rng(0)
    img, _ = painted_slide(rng, (320, 240), tissue=[(20, 20, 280, 200)], tumour=[(60, 60, 80, 60)])
    slide = write_slide(tmp_path / "slides" / "case.tif", img, mpp=0.25, tile=64, levels=2)
    assert main(["predict", str(run / "teacher.safetensors"), str(slide), "--out", str(tmp_path / "pred"),
                 "--workers", "1", "--quiet"]) == 0
    summary = json.loads((tmp_path / "pred" / "case" / "summary.json").read_text())
    assert summary["model_mpp_source"] == "model file" and summary["model_mpp"] == meta["mpp"]
