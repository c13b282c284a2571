"""Every benchmark still runs after a rename: `--help` for all, a tiny real run where one is cheap.

Benchmarks print JSON lines; these tests check that the lines parse, never what the figures are.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "timing.py")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


@pytest.mark.parametrize("script, args", [
    ("backbones.py", ["--backbones", "vgg16", "--size", "32", "--device", "cpu", "--batch-size", "1",
                      "--iters", "1", "--warmup", "0"]),
    ("throughput.py", ["--size", "32", "--batches", "2", "--images", "8", "--steps", "1", "--warmup", "0",
                       "--device", "cpu"]),
    ("backends.py", ["--shapes", "32x1", "--backends", "eager,channels_last,no-such", "--steps", "1",
                     "--warmup", "0"]),
])
def test_tiny_run_prints_json_lines(script, args):
    proc = _run(script, *args)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and all(isinstance(r, dict) for r in lines)


def test_gpu_script_parses_and_names_every_step():
    script = (BENCH / "gpu.sh").read_text()
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], capture_output=True).returncode == 0
    for name in ("throughput-eager", "throughput-compile", "throughput-cudagraphs", "wsi", "glas-paper"):
        assert f"step {name} " in script


def test_stain_shift_scores_a_model_with_and_without_normalisation(tiny_synth, tmp_path):
    import numpy as np
    from PIL import Image

    from ikdmil.models import create_model
    from ikdmil.models.checkpoint import save_model
    from ikdmil.stain import training_references, training_stats

    train = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((tiny_synth / "train").rglob("*.png"))
                      if "masks" not in p.parts])
    model, _ = create_model("vgg16", pretrained="none")
    stain = dict(training_stats(train).to_meta(), **training_references(train, 0.5))
    path = save_model(model, tmp_path / "m.safetensors", input_size=32, stain=stain)
    proc = _run("stain_shift.py", str(path), str(tiny_synth), "--shifts", "1,1;1.6,0.6", "--device", "cpu",
                "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["haematoxylin"], r["normalise"]) for r in lines] == [
        (h, m) for h in (1, 1.6) for m in ("none", "reinhard", "macenko")]
    assert all(0 <= r["f1"] <= 1 and r["images"] > 0 for r in lines)
    old = save_model(model, tmp_path / "old.safetensors", input_size=32)
    proc = _run("stain_shift.py", str(old), str(tiny_synth), "--device", "cpu", "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 2 and "old.safetensors: the model file has no stain reference" in proc.stderr
    # references measured on the train split as training does; two models: then mean and std over them
    proc = _run("stain_shift.py", str(old), str(path), str(tiny_synth), "--device", "cpu", "--cache-dir",
                str(tmp_path / "c"), "--shifts", "1,1", "--reference", "train")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["normalise"] for r in lines] == ["none", "reinhard", "macenko"] * 3
    for summary in lines[6:]:
        runs = [r["f1"] for r in lines[:6] if r["normalise"] == summary["normalise"]]
        assert summary["summary"] and summary["models"] == 2
        assert summary["f1_mean"] == pytest.approx(np.mean(runs)) and summary["f1_std"] == pytest.approx(
            np.std(runs, ddof=1))
