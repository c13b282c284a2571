"""`ikdmil experiment`: variants x seeds on the tiny synthetic set with the smoke profile.

One module-scoped experiment (mil, ikd, no-wce x 2 seeds: 2 teachers + 4 distillations, seconds)
serves the run, sharing, resume, table and plot tests. Variants whose RunConfig field the engine
does not have yet are skipped with "requires RunConfig.<field>".
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ikdmil.cli import main
from ikdmil.config import RunConfig
from ikdmil.errors import IkdmilError
from ikdmil.experiment import PROFILES, VARIANTS, ExperimentSettings, Plan
from ikdmil.experiment.plots import binned, read_validations
from ikdmil.experiment.tables import mean_std
from ikdmil.experiment.variants import apply_overrides, missing_fields

SEEDS = (0, 1)
MAIN_VARIANTS = ("mil", "ikd", "no-wce")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def experiment_args(data, out, variants, seeds=2, *extra):
    return ("experiment", str(data), "--out", str(out), "--profile", "smoke", "--variants", ",".join(variants),
            "--seeds", str(seeds), "--device", "cpu", *extra)


def require(*variants: str) -> None:
    for v in variants:
        missing = missing_fields(VARIANTS[v].resolve(RunConfig()))
        if missing:
            pytest.skip(f"requires RunConfig.{missing[0]}")


@pytest.fixture(scope="module")
def experiment(tiny_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "exp"
    code, stdout, stderr = run_cli(*experiment_args(tiny_synth, out, MAIN_VARIANTS))
    assert code == 0, stderr
    return out, stdout


def run_files(out: Path) -> dict[Path, int]:
    """mtime of every file under the run folders (not the tables and plots)."""
    return {p: p.stat().st_mtime_ns for p in sorted((out / "vgg16").rglob("*")) if p.is_file()}


def results(out: Path, folder: str, seed: int) -> dict:
    return json.loads((out / "vgg16" / folder / f"seed{seed}" / "results.json").read_text())


# ------------------------------------------------------------------ the run
def test_runs_every_pair_and_trains_one_teacher_per_seed(experiment):
    out, stdout = experiment
    assert "6 runs, 0 finished, 6 to run" in stdout
    assert [line.split("]")[0] + "]" for line in stdout.splitlines() if line.startswith("[") and "->" in line] == \
        [f"[{i}/6]" for i in range(1, 7)]
    with_teacher_epochs = []
    for metrics in sorted((out / "vgg16").rglob("metrics.csv")):
        phases = {row["phase"] for row in csv.DictReader(metrics.open())}
        if "teacher" in phases:
            with_teacher_epochs.append(metrics.parent.relative_to(out).as_posix())
    assert with_teacher_epochs == [f"vgg16/teacher/seed{s}" for s in SEEDS]  # one stage-1 training per seed
    for seed in SEEDS:
        teacher = results(out, "teacher", seed)["models"]["teacher"]["test"]
        for folder in ("ikd", "no-wce"):
            run = out / "vgg16" / folder / f"seed{seed}"
            assert (run / "student.safetensors").is_file() and (run / "experiment_run.json").is_file()
            assert RunConfig.load(run / "config.yaml").seed == seed
            # the distillation read the shared teacher: same test scores
            assert results(out, folder, seed)["models"]["teacher"]["test"]["f1"] == pytest.approx(teacher["f1"])
    assert RunConfig.load(out / "vgg16/no-wce/seed0/config.yaml").wce_scale == 0.0
    assert RunConfig.load(out / "vgg16/ikd/seed0/config.yaml").wce_scale == 0.25
    assert (out / "experiment_config.yaml").is_file()


def test_resume_skips_finished_pairs(experiment, tiny_synth, monkeypatch):
    out, _ = experiment
    before = run_files(out)
    import ikdmil.engine.pipeline as pipeline

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pipeline.Pipeline, "run", no_training)
    code, stdout, stderr = run_cli(*experiment_args(tiny_synth, out, MAIN_VARIANTS))
    assert code == 0, stderr
    assert "6 runs, 6 finished, 0 to run" in stdout
    assert run_files(out) == before


def test_interrupted_run_is_resumed_alone(experiment, tiny_synth):
    out, _ = experiment
    marker = out / "vgg16/no-wce/seed1/experiment_run.json"
    marker.unlink()  # as if the call had been stopped after the pipeline, before the marker
    others = {p: t for p, t in run_files(out).items() if "no-wce/seed1" not in p.as_posix()}
    code, stdout, stderr = run_cli(*experiment_args(tiny_synth, out, MAIN_VARIANTS))
    assert code == 0, stderr
    assert "1 to run" in stdout and "[1/1] vgg16 no-wce seed 1" in stdout
    assert marker.is_file()
    assert {p: t for p, t in run_files(out).items() if p in others} == others


def test_variants_with_equal_configs_share_one_run(experiment, tiny_synth):
    out, _ = experiment
    code, stdout, stderr = run_cli(*experiment_args(tiny_synth, out, ("ikd", "wce-0.25", "wce-0")))
    assert code == 0, stderr
    assert "0 to run" in stdout  # wce-0.25 is ikd's run, wce-0 is no-wce's
    table = json.loads((out / "table.json").read_text())
    rows = {(r["variant"], r["model"]): r for r in table["rows"]}
    assert rows[("wce-0.25", "student")]["runs"] == rows[("ikd", "student")]["runs"]
    assert rows[("wce-0", "student")]["runs"] == [f"vgg16/no-wce/seed{s}" for s in SEEDS]
    # the shared teacher is the same run whichever variant asks for it first
    code, stdout, stderr = run_cli(*experiment_args(tiny_synth, out, ("no-wce", "mil")))
    assert code == 0 and "0 to run" in stdout, stderr
    run_cli(*experiment_args(tiny_synth, out, MAIN_VARIANTS))  # restore the main tables for other tests


# ------------------------------------------------------------------ tables
def test_table_mean_std_from_per_run_results(experiment):
    out, _ = experiment
    table = json.loads((out / "table.json").read_text())
    rows = {(r["variant"], r["model"]): r for r in table["rows"]}
    assert set(rows) == {("mil", "teacher"), ("ikd", "teacher"), ("ikd", "student"), ("no-wce", "teacher"),
                         ("no-wce", "student")}
    csv_rows = {(r["variant"], r["model"]): r for r in csv.DictReader((out / "table.csv").open())}
    md = (out / "table.md").read_text()
    for (variant, model), row in rows.items():
        folder = "teacher" if variant == "mil" else variant
        tests = [results(out, folder, s)["models"][model]["test"] for s in SEEDS]
        for m in ("f1", "iou", "hd", "hd95"):
            values = np.array([t[m] for t in tests], dtype=float)
            mean, std = values.mean(), values.std(ddof=1)
            stat = row["metrics"][m]
            assert stat["values"] == pytest.approx(list(values))
            assert stat["mean"] == pytest.approx(mean) and stat["std"] == pytest.approx(std)
            assert float(csv_rows[(variant, model)][f"{m}_mean"]) == pytest.approx(mean)
            assert float(csv_rows[(variant, model)][f"{m}_std"]) == pytest.approx(std)
            assert float(csv_rows[(variant, model)][f"{m}_seed1"]) == pytest.approx(values[1])
        if model == "student":
            teacher_f1 = np.array([results(out, folder, s)["models"]["teacher"]["test"]["f1"] for s in SEEDS])
            diff = np.array([t["f1"] for t in tests]) - teacher_f1
            assert row["delta"]["f1"]["mean"] == pytest.approx(diff.mean())
            assert row["delta"]["f1"]["std"] == pytest.approx(diff.std(ddof=1))
        f1 = np.array([t["f1"] for t in tests])
        if (variant, model) != ("ikd", "teacher") and (variant, model) != ("no-wce", "teacher"):
            assert f"| vgg16 | {variant} | {model} | 2 | {f1.mean():.3f} ± {f1.std(ddof=1):.3f} |" in md
    # the shared teacher is listed once in the markdown, and a metric the summaries lack is a dash
    assert md.count("| teacher |") == 2  # main table + per-seed table, mil only
    if "hd_paper" not in results(out, "teacher", 0)["models"]["teacher"]["test"]:
        assert rows[("mil", "teacher")]["metrics"]["hd_paper"]["mean"] is None
        assert csv_rows[("mil", "teacher")]["hd_paper_mean"] == ""


def test_mean_std_rules():
    assert mean_std([]) == (None, None)
    assert mean_std([None, 0.5]) == (0.5, 0.0)
    m, s = mean_std([0.666, 0.654, 0.650])  # the teacher row: 0.657 ± 0.008
    assert round(m, 3) == 0.657 and round(s, 3) == 0.008
    assert s == pytest.approx(math.sqrt(((0.666 - m) ** 2 + (0.654 - m) ** 2 + (0.650 - m) ** 2) / 2))


# ------------------------------------------------------------------ plots
def test_plots_are_png(experiment):
    out, _ = experiment
    plots = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["vgg16-wce.png"]  # ikd vs no-wce; "all" would be the same curves
    from PIL import Image

    for p in plots:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_bins_take_the_best_validation_and_its_test_score(tmp_path):
    (tmp_path / "metrics.csv").write_text(
        "phase,epoch,loss,val_f1,test_f1\n"
        "teacher,1,1.0,0.9,0.9\n"
        "distill,1,1.0,0.5,0.40\n"
        "distill,2,1.0,0.7,0.30\n"
        "distill,3,1.0,0.6,0.99\n"
        "distill,4,1.0,,\n"
        "distill,5,1.0,0.2,0.10\n")
    points = read_validations(tmp_path)
    assert points == [(1, 0.5, 0.40), (2, 0.7, 0.30), (3, 0.6, 0.99), (5, 0.2, 0.10)]
    assert binned(points, 3) == {3: (0.7, 0.30), 6: (0.2, 0.10)}  # test F1 where val was best, not the best test
    (tmp_path / "metrics.csv").write_text(  # the older columns
        "phase,epoch,loss,val_teacher,val_student,swapped\ndistill,1,1,0.5,,\ndistill,2,1,0.5,0.6,True\n")
    assert read_validations(tmp_path) == [(2, 0.6, None)]
    (tmp_path / "metrics.csv").write_text(  # --selection auc: the curve follows what selected (val_score)
        "phase,epoch,loss,val_f1,val_auc,val_score,test_f1\ndistill,1,1,0.5,0.75,0.75,0.4\n")
    assert read_validations(tmp_path) == [(1, 0.75, 0.4)]


# ------------------------------------------------------------------ bad specs
@pytest.mark.parametrize("change, needle", [
    ({"variants": "mil,bogus"}, "unknown variant"),
    ({"backbone": "vgg99"}, "unknown backbone"),
    ({"profile": "huge"}, "unknown profile"),
    ({"data": "missing"}, "dataset not found"),
    ({"seeds": "0"}, "--seeds"),
    ({"set": "lr=fast"}, "--set"),
])
def test_bad_spec_is_one_line_before_any_work(tiny_synth, tmp_path, change, needle):
    out = tmp_path / "exp"
    data = tmp_path / "missing" if "data" in change else tiny_synth
    argv = ["experiment", str(data), "--out", str(out), "--profile", change.get("profile", "smoke"),
            "--variants", change.get("variants", "mil,ikd"), "--seeds", change.get("seeds", "1")]
    if "backbone" in change:
        argv += ["--backbones", f"vgg16,{change['backbone']}"]
    if "set" in change:
        argv += ["--set", change["set"]]
    code, stdout, stderr = run_cli(*argv)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and needle in stderr, stderr
    assert not out.exists()


def test_folder_of_other_settings_is_refused(experiment, tiny_synth):
    out, _ = experiment
    code, _, stderr = run_cli(*experiment_args(tiny_synth, out, ("mil",), 1, "--set", "lr=0.5"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "other settings" in stderr


def test_variant_of_a_missing_field_is_one_line_before_any_work(tiny_synth, tmp_path, monkeypatch):
    from ikdmil.experiment.variants import Variant

    monkeypatch.setitem(VARIANTS, "future", Variant("future", "needs a newer engine", {"no_such_field": 1}))
    out = tmp_path / "exp"
    code, _, stderr = run_cli(*experiment_args(tiny_synth, out, ("mil", "future"), 1))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "variant 'future' needs RunConfig field(s) no_such_field" in stderr
    assert not out.exists()


def test_unknown_field_is_one_line():
    with pytest.raises(IkdmilError, match="variant 'x' needs RunConfig field.s. no_such_field"):
        apply_overrides(RunConfig(), {"no_such_field": 1}, "variant 'x'")


# ------------------------------------------------------------------ variants and profiles
def test_every_variant_and_profile_is_defined():
    assert {"mil", "ikd", "kd-output", "kd-block", "kd-fusion", "no-swap", "no-wce", "wce-0", "wce-0.1",
            "wce-0.25", "wce-0.5", "wce-1", "wce-5", "wd-authors", "select-auc", "oeem", "oaa", "pistoseg",
            "supervised-unet", "stain-aug", "stain-aug-mil"} == set(VARIANTS)
    assert set(PROFILES) == {"smoke", "cpu", "paper"}


def test_stain_jitter_trains_its_own_teacher_shared_by_its_two_rows():
    from ikdmil.experiment.variants import stage1_key

    base = RunConfig()
    keys = {n: stage1_key(apply_overrides(base, VARIANTS[n].resolve(base), n)) for n in ("ikd", "stain-aug",
                                                                                         "stain-aug-mil")}
    assert keys["stain-aug"] == keys["stain-aug-mil"] != keys["ikd"]
    paper = PROFILES["paper"].overrides
    assert (paper["input_size"], paper["teacher_epochs"], paper["fusion_epochs"], paper["distill_epochs"],
            paper["swap_every"]) == (256, 30, 10, 450, 30)
    assert PROFILES["cpu"].overrides["input_size"] == 128
    # the authors' 5e-5 on batch sums is 5e-5 / B on our batch means
    assert VARIANTS["wd-authors"].resolve(RunConfig(batch_size=16)) == {"weight_decay": 5e-5 / 16}


def test_backbone_rows_use_their_own_teacher_loss(tiny_synth, tmp_path):
    plan = Plan(ExperimentSettings(data=str(tiny_synth), out=str(tmp_path / "exp"), profile="smoke",
                                   variants="mil,ikd,wd-authors", seeds=1, backbones="vgg16,resnet18"))
    teachers = {(j.backbone, j.run_dir.parent.name): j for j in plan.jobs if j.kind == "teacher"}
    assert set(teachers) == {("vgg16", "teacher"), ("vgg16", "teacher-wd-authors"), ("resnet18", "teacher"),
                             ("resnet18", "teacher-wd-authors")}
    assert teachers[("vgg16", "teacher")].cfg.teacher_loss == "dice"
    assert teachers[("resnet18", "teacher")].cfg.teacher_loss == "gem"
    assert teachers[("vgg16", "teacher-wd-authors")].cfg.weight_decay == pytest.approx(5e-5 / 4)
    assert len([j for j in plan.jobs if j.kind == "distill"]) == 4
    assert not (tmp_path / "exp").exists()  # planning does no work


def test_select_auc_differs_from_ikd_only_in_selection_and_has_its_own_auc_teacher(tiny_synth, tmp_path):
    from ikdmil.experiment.variants import comparable

    plan = Plan(ExperimentSettings(data=str(tiny_synth), out=str(tmp_path / "exp"), profile="smoke",
                                   variants="mil,ikd,select-auc", seeds=1))
    distill = {j.variants[0]: j for j in plan.jobs if j.kind == "distill"}
    ikd, auc = distill["ikd"].cfg.to_dict(), distill["select-auc"].cfg.to_dict()
    assert {k for k in ikd if ikd[k] != auc[k]} == {"selection", "out"} and auc["selection"] == "auc"
    teacher = distill["select-auc"].teacher
    assert teacher.run_dir.parent.name == "teacher-select-auc" and teacher.cfg.selection == "auc"
    assert distill["ikd"].teacher.cfg.selection == "auto"
    # a default selection stays out of the keys, so runs finished before the option existed are reused
    assert "selection" not in comparable(RunConfig()) and "selection_top_percent" not in comparable(RunConfig())
    assert comparable(RunConfig(selection="auc"))["selection"] == "auc"
    # ...but every key names the pipeline: runs of the squeezed pipeline (1) are never reused as this one's
    from ikdmil.experiment.variants import PIPELINE

    assert PIPELINE == 2 and comparable(RunConfig())["pipeline"] == PIPELINE


@pytest.mark.parametrize("variant, field, value", [
    ("kd-output", "kd_structure", "output"),
    ("kd-block", "kd_structure", "block"),
    ("no-swap", "swap", False),
])
def test_variants_of_newer_fields_run(tiny_synth, tmp_path, variant, field, value):
    require(variant)
    out = tmp_path / "exp"
    code, stdout, stderr = run_cli(*experiment_args(tiny_synth, out, ("ikd", variant), 1))
    assert code == 0, stderr
    assert getattr(RunConfig.load(out / "vgg16" / variant / "seed0" / "config.yaml"), field) == value
    rows = {(r["variant"], r["model"]) for r in json.loads((out / "table.json").read_text())["rows"]}
    assert (variant, "student") in rows


def test_kd_fusion_is_ikd(tiny_synth, tmp_path):
    require("kd-fusion")
    plan = Plan(ExperimentSettings(data=str(tiny_synth), out=str(tmp_path / "exp"), profile="smoke",
                                   variants="ikd,kd-fusion", seeds=1))
    assert [j.variants for j in plan.jobs if j.kind == "distill"] == [["ikd", "kd-fusion"]]


def test_profiles_log_every_validation_and_test_f1(tiny_synth, tmp_path):
    for f in ("val_every", "track_test"):
        if f not in {x.name for x in __import__("dataclasses").fields(RunConfig)}:
            pytest.skip(f"requires RunConfig.{f}")
    out = tmp_path / "exp"
    code, _, stderr = run_cli(*experiment_args(tiny_synth, out, ("ikd",), 1))
    assert code == 0, stderr
    cfg = RunConfig.load(out / "vgg16/ikd/seed0/config.yaml")
    assert cfg.val_every == 1 and cfg.track_test is True
    points = read_validations(out / "vgg16/ikd/seed0")
    assert len(points) == cfg.distill_epochs and all(t is not None for _, _, t in points)
    assert (out / "plots" / "vgg16-all.png").is_file()
