"""Model selection by validation F1 or, with image labels only, by the image AUC of the fused map."""

import csv
import logging

import numpy as np
import pytest

from ikdmil.data.manifest import Sample, load_samples, write_manifest
from ikdmil.engine.pipeline import Pipeline
from ikdmil.errors import IkdmilError


def _manifest(data, folder, drop):
    """`data`'s manifest in `folder` with the mask of every sample `drop(sample)` accepts removed."""
    samples = [Sample(s.image, s.label, None if drop(s) else s.mask, s.split) for s in load_samples(data)]
    return write_manifest(samples, folder / "manifest.csv")


def _first_val_positive(data):
    return next(s.image for s in load_samples(data) if s.split == "val" and s.label == 1)


def test_auto_is_f1_with_every_mask_and_auc_when_one_positive_lacks_it(tiny_synth, tmp_path, tiny_config,
                                                                        tiny_backbone, caplog):
    full = Pipeline(tiny_config(tiny_synth, tmp_path / "a", backbone=tiny_backbone), progress=False)
    assert full.selection == "f1" and full.selection_name() == "val F1"
    one = _first_val_positive(tiny_synth)
    manifest = _manifest(tiny_synth, tmp_path / "one", lambda s: s.image == one)
    with caplog.at_level(logging.INFO, logger="ikdmil"):
        partial = Pipeline(tiny_config(manifest, tmp_path / "b", backbone=tiny_backbone), progress=False)
    assert partial.selection == "auc" and not partial.val_has_masks
    notes = [r.getMessage() for r in caplog.records if "model selection uses the ROC AUC" in r.getMessage()]
    assert len(notes) == 1 and "1 validation positive(s) have no mask" in notes[0]


def test_f1_with_a_missing_mask_is_one_line_naming_the_split_and_the_fix(tiny_synth, tmp_path, tiny_config):
    one = _first_val_positive(tiny_synth)
    manifest = _manifest(tiny_synth, tmp_path / "one", lambda s: s.image == one)
    with pytest.raises(IkdmilError) as err:
        Pipeline(tiny_config(manifest, tmp_path / "run", selection="f1"), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and str(manifest) in msg and "validation split" in msg
    assert "1 positive image(s) without a mask" in msg and "--selection auc" in msg


def test_auc_needs_both_classes_in_validation(tiny_synth, tmp_path, tiny_config):
    samples = [s for s in load_samples(tiny_synth) if not (s.split == "val" and s.label == 0)]
    manifest = write_manifest(samples, tmp_path / "pos" / "manifest.csv")
    with pytest.raises(IkdmilError, match="only positive images.*--selection auc.*needs both"):
        Pipeline(tiny_config(manifest, tmp_path / "run", selection="auc"), progress=False)
    f1 = Pipeline(tiny_config(manifest, tmp_path / "f1", selection="f1"), progress=False)
    assert f1.selection == "f1"  # F1 needs no negative; val_auc is then left out of metrics.csv


def _rows(run_dir, phase):
    with (run_dir / "metrics.csv").open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["phase"] == phase and r.get("val_score")]


def test_auc_selection_picks_the_auc_argmax_and_logs_f1_too(tiny_synth, tmp_path, tiny_config, tiny_backbone):
    cfg = tiny_config(tiny_synth, tmp_path / "run", backbone=tiny_backbone, selection="auc", teacher_epochs=3,
                      distill_epochs=2, swap_every=5, lr=3e-2, eval_sigma=1.0, selection_top_percent=20.0)
    pipe = Pipeline(cfg, progress=False)
    results = pipe.run()
    assert results["selection_metric"] == "val AUC (top 20 % mean)"
    teacher = _rows(tmp_path / "run", "teacher")
    assert len(teacher) == 3 and all(r["val_f1"] != "" for r in teacher)  # masks exist: F1 is logged anyway
    auc = [float(r["val_auc"]) for r in teacher]
    assert [float(r["val_score"]) for r in teacher] == auc
    assert pipe.sel.teacher_best.epoch == int(np.argmax(auc)) + 1  # the first of the best, as selection keeps it
    student = _rows(tmp_path / "run", "distill")
    best = max(float(r["val_auc"]) for r in student)
    assert results["models"]["student"]["val_score"] == pytest.approx(best)
    picked = max(results["models"], key=lambda role: results["models"][role]["val_score"])
    assert results["selected"] == picked


def test_every_decision_follows_the_auc(tiny_synth, tmp_path, tiny_config, tiny_backbone, monkeypatch):
    """Scripted AUCs (whatever the model): best teacher epoch, fusion keep/reject, swap, best student and
    the final model must all follow them, not the validation F1 logged beside them."""
    import ikdmil.engine.run as run

    script = iter([0.2, 0.9, 0.4, 0.6,  # teacher epochs: the best is epoch 2
                   0.9, 0.5,  # fusion: uniform weights 0.9, fitted 0.5 -> back to uniform
                   0.3, 0.95, 0.7])  # student epochs: epoch 2 beats the teacher's 0.9 -> swap, and is the best
    monkeypatch.setattr(run, "image_auc_of", lambda *args: next(script))
    cfg = tiny_config(tiny_synth, tmp_path / "run", backbone=tiny_backbone, selection="auc", teacher_epochs=4,
                      distill_epochs=3, swap_every=2)
    pipe = Pipeline(cfg, progress=False)
    results = pipe.run()
    assert next(script, None) is None  # every validation went through the AUC
    assert pipe.sel.teacher_best.epoch == 2 and pipe.sel.swaps == 1
    assert _rows(tmp_path / "run", "fusion")[-1]["fusion_kept"] == "0"
    assert [r["swap"] for r in _rows(tmp_path / "run", "distill")] == ["0", "1", "0"]
    assert results["models"]["teacher"]["val_score"] == 0.9
    assert results["models"]["student"]["val_score"] == 0.95 and results["selected"] == "student"


def test_a_comparison_method_selects_by_auc_too(tiny_synth, tmp_path, tiny_config, tiny_backbone):
    from ikdmil.methods import get_method

    cfg = tiny_config(tiny_synth, tmp_path / "run", backbone=tiny_backbone, method="oeem", selection="auc")
    results = get_method("oeem").train(cfg, progress=False)
    assert results["selection_metric"].startswith("val AUC")
    assert "label-only" in results["pseudo_masks"]["threshold_rule"]  # the CAM threshold ignores the masks
    seg = _rows(tmp_path / "run", "segnet")
    assert seg and all(r["val_score"] == r["val_auc"] for r in seg)
    assert results["models"]["segnet"]["val_score"] == pytest.approx(max(float(r["val_auc"]) for r in seg))
