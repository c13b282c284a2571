"""`benchmarks/wsi.py --smoke` still runs against the current API (a rename cannot break it unnoticed).

Only the shape of the output is checked, never a timing: figures of a shared machine mean nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import ikdmil

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "wsi.py"


def test_wsi_benchmark_smoke_prints_one_json_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(ikdmil.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--device", "cpu", "--work", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["benchmark"] == "wsi-predict-smoke" and result["tiles"] > 0
    for key in ("tiles_per_s", "tissue_mpx_per_s_level0", "peak_mem_mb", "slide_px", "device"):
        assert key in result
