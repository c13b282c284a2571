"""Every comparison method trains a few steps on tiny synthetic data through `ikdmil run --method` and
writes model files that `evaluate` and `predict` accept; the weak ones never read training masks;
an interrupted run resumes to the same weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ikdmil.io
from ikdmil.cli import main
from ikdmil.models.checkpoint import load_model, read_model_meta

TINY = ["--backbone", "tiny", "--decoder-width", "8", "--input-size", "32", "--batch-size", "4", "--pretrained", "none",
        "--lr", "1e-3", "--eval-sigma", "0",
        "--teacher-epochs", "1", "--fusion-epochs", "1", "--distill-epochs", "1", "--swap-every", "1",
        "--cam-epochs", "1", "--seg-epochs", "1", "--device", "cpu", "--quiet"]
WEAK = ("ikd", "oeem", "oaa", "pistoseg")


@pytest.fixture(scope="module")
def garbage_masks(tiny_synth, tmp_path_factory) -> Path:
    """tiny_synth with every *training* mask file replaced by bytes no image reader accepts."""
    data = tmp_path_factory.mktemp("garbage") / "data"
    shutil.copytree(tiny_synth, data)
    masks = sorted((data / "train" / "masks").glob("*.png"))
    assert masks
    for m in masks:
        m.write_bytes(b"not a mask: weakly supervised methods must never open this file")
    return data


@pytest.fixture
def mask_reads(monkeypatch) -> list[Path]:
    """Every path `read_mask` is asked to read during the test."""
    seen: list[Path] = []
    real = ikdmil.io.read_mask

    def spy(path, *args, **kwargs):
        seen.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ikdmil.io, "read_mask", spy)
    monkeypatch.setattr("ikdmil.data.dataset.read_mask", spy)
    return seen


def run(data: Path, out: Path, method: str, *extra: str) -> int:
    return main(["run", str(data), "--out", str(out), "--method", method, "--cache-dir", str(out.parent / "cache"),
                 *TINY, *extra])


@pytest.mark.parametrize("method", WEAK)
def test_weak_methods_train_without_training_masks_and_their_models_evaluate_and_predict(
        method, garbage_masks, mask_reads, tmp_path, capsys, tiny_backbone):
    out = tmp_path / "run"
    assert run(garbage_masks, out, method) == 0, capsys.readouterr().err
    assert not [p for p in mask_reads if "train" in p.parts]  # validation / test masks only
    meta = read_model_meta(out / "model.safetensors")
    assert meta["method"] == method
    assert meta["head"] == ("mil" if method == "ikd" else "segnet")
    if method != "ikd":
        assert (out / "pseudo_masks_val.npy").is_file() and (out / "segnet.safetensors").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(out / "model.safetensors"), str(garbage_masks), "--split", "test", "--eval-sigma",
                 "0", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "ev"), "--device", "cpu",
                 "--quiet"]) == 0
    assert "F1" in capsys.readouterr().out
    image = sorted((garbage_masks / "val" / "pos").glob("*.png"))[0]
    assert main(["predict", str(out / "model.safetensors"), str(image), "--out", str(tmp_path / "pred"),
                 "--device", "cpu", "--quiet"]) == 0
    assert (tmp_path / "pred" / "masks" / image.name).is_file()


def test_supervised_unet_trains_on_masks_and_refuses_unreadable_or_missing_ones(
        tiny_synth, garbage_masks, tmp_path, capsys, tiny_backbone):
    out = tmp_path / "run"
    assert run(tiny_synth, out, "supervised-unet") == 0, capsys.readouterr().err
    model, meta = load_model(out / "model.safetensors")
    assert meta["method"] == "supervised-unet" and meta["role"] == "segnet"
    capsys.readouterr()

    assert run(garbage_masks, tmp_path / "bad", "supervised-unet") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ikdmil: error:") and "masks" in err

    data = tmp_path / "nomask"
    shutil.copytree(tiny_synth, data)
    rows = list(csv.DictReader((data / "manifest.csv").open()))
    first_pos = next(r for r in rows if r["split"] == "train" and r["label"] == "1")
    first_pos["mask"] = ""
    with (data / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert run(data, tmp_path / "nomask-run", "supervised-unet") == 2
    err = capsys.readouterr().err.strip()
    assert (len(err.splitlines()) == 1 and "supervised-unet trains on pixel masks" in err
            and "1 training positive" in err)


def test_method_option_is_checked_and_stage_commands_are_ikd_only(tiny_synth, tmp_path, capsys):
    assert run(tiny_synth, tmp_path / "r", "nope") == 2
    assert "--method must be one of ikd, oaa, oeem, pistoseg, supervised-unet" in capsys.readouterr().err
    assert main(["train", str(tiny_synth), "--out", str(tmp_path / "t"), "--method", "oeem", "--quiet"]) == 2
    assert "ikdmil run DATA --method oeem" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_an_interrupted_run_resumes_to_the_same_model(tiny_synth, tmp_path, tiny_config, tiny_backbone):
    from ikdmil.methods.oaa import OAARun

    def cfg(name):
        return tiny_config(tiny_synth, tmp_path / name, cam_epochs=2, seg_epochs=2, method="oaa",
                           backbone=tiny_backbone, decoder_width=8)

    OAARun(cfg("whole"), progress=False).run()

    class Stop(Exception):
        pass

    def stop(phase, epoch):
        if (phase, epoch) == ("cam", 1):  # inside the accumulation: the accumulators must survive
            raise Stop

    first = OAARun(cfg("cut"), progress=False)
    first.epoch_hooks.append(stop)
    with pytest.raises(Stop):
        first.run()
    assert not (tmp_path / "cut" / "segnet.safetensors").exists()
    OAARun(cfg("cut"), resume=True, progress=False).run()
    whole, cut = (load_file(str(tmp_path / d / "segnet.safetensors")) for d in ("whole", "cut"))
    assert whole.keys() == cut.keys()
    for k in whole:
        assert torch.equal(whole[k], cut[k]), k
    assert ((tmp_path / "whole" / "pseudo_masks_val.npy").read_bytes()
            == (tmp_path / "cut" / "pseudo_masks_val.npy").read_bytes())


@pytest.mark.parametrize("method", ("oaa", "pistoseg", "supervised-unet"))
def test_methods_train_on_non_square_images_at_one_scale(method, tmp_path, tiny_backbone):
    """Crops of 72 x 48 px images (GlaS-like, 0.62 µm/px) reach the per-image targets (supervised), the
    CAM accumulation at each crop's place (OAA) and the mosaics (PistoSeg; OEEM shares the CAM stage, IKD
    is trained on such data by tests/test_resolution.py); the model file stores the scale and the test
    scores cover every whole image."""
    from fakes.glas import make_fake_glas_official

    make_fake_glas_official(tmp_path / "src", size=(72, 48))
    assert main(["prepare", "glas", str(tmp_path / "src"), str(tmp_path / "data"), "--quiet"]) == 0
    assert run(tmp_path / "data", tmp_path / "run", method) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert all(entry["test"]["n"] == 6 for entry in results["models"].values())
    assert read_model_meta(tmp_path / "run" / "model.safetensors")["mpp"] == pytest.approx(0.62 * 48 / 32)
