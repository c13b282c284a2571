"""Table 1's comparison rows in `ikdmil experiment`: planned as standalone runs, reported as "segnet",
IKD runs' keys untouched by the new fields, and the pseudo-masks figure."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np

from ikdmil.cli import main
from ikdmil.config import RunConfig
from ikdmil.experiment import ExperimentSettings, Plan
from ikdmil.experiment.plots import pseudo_mask_figure
from ikdmil.experiment.variants import METHOD_FIELDS, comparable, run_key, stage1_key

ROWS = "mil,ikd,oeem,oaa,pistoseg,supervised-unet"
PNG = b"\x89PNG\r\n\x1a\n"


def test_comparison_rows_are_standalone_runs_and_leave_ikd_keys_alone(tiny_synth, tmp_path):
    plan = Plan(ExperimentSettings(data=str(tiny_synth), out=str(tmp_path / "exp"), profile="smoke",
                                   variants=ROWS, seeds=2))
    methods = [j for j in plan.jobs if j.kind == "method"]
    assert sorted((j.variants[0], j.seed) for j in methods) == sorted(
        (m, s) for m in ("oeem", "oaa", "pistoseg", "supervised-unet") for s in (0, 1))
    for j in methods:
        assert j.cfg.method == j.variants[0] and j.teacher is None
        assert j.run_dir == tmp_path / "exp" / "vgg16" / j.variants[0] / f"seed{j.seed}"
        assert (j.cfg.cam_epochs, j.cfg.seg_epochs) == (1, 1)  # the smoke profile's
    assert {j.kind for j in plan.jobs} == {"teacher", "distill", "method"}
    assert len([j for j in plan.jobs if j.kind == "teacher"]) == 2  # mil and ikd still share one per seed

    # IKD runs compute nothing the comparison rows' fields change: their keys ignore them
    ikd = RunConfig()
    assert not set(comparable(ikd)) & {"method", *METHOD_FIELDS}
    changed = dataclasses.replace(ikd, cam_epochs=3, mosaic_grid=4)
    assert run_key(changed) == run_key(ikd) and stage1_key(changed) == stage1_key(ikd)
    oeem = dataclasses.replace(ikd, method="oeem")
    assert run_key(dataclasses.replace(oeem, cam_epochs=3)) != run_key(oeem) != run_key(ikd)


def test_experiment_reports_the_rows_and_draws_the_pseudo_masks_figure(tiny_synth, tmp_path, tiny_backbone):
    out = tmp_path / "exp"
    argv = ["experiment", str(tiny_synth), "--out", str(out), "--profile", "smoke", "--variants", "ikd,oeem",
            "--seeds", "1", "--backbones", tiny_backbone, "--device", "cpu", "--set", "decoder_width=8"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    table = json.loads((out / "table.json").read_text())
    rows = {(r["variant"], r["model"]): r for r in table["rows"]}
    assert {("ikd", "teacher"), ("ikd", "student"), ("oeem", "segnet")} <= set(rows)
    assert rows[("oeem", "segnet")]["metrics"]["f1"]["mean"] is not None
    assert "| tiny | oeem | segnet | 1 |" in (out / "table.md").read_text()
    figure = out / "plots" / f"{tiny_backbone}-pseudo-masks.png"
    assert figure.read_bytes()[:8] == PNG
    again = io.StringIO()
    with contextlib.redirect_stdout(again):
        assert main(argv) == 0
    assert "0 to run" in again.getvalue()


def test_pseudo_mask_figure_is_a_png_grid(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    truths = rng.random((2, 16, 16)) > 0.5
    path = pseudo_mask_figure(tmp_path / "f" / "fig.png", images, truths,
                              [("cam pseudo-mask", truths.astype(np.uint8)), ("teacher", rng.random((2, 16, 16)))],
                              "title")
    assert path.read_bytes()[:8] == PNG
