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
