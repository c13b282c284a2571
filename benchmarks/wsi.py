"""Whole-slide inference benchmark: throughput and peak memory of `ikdmil predict` on a generated slide.

Generates (once, cached under --work) a tiled pyramidal TIFF of --size x --size px at --mpp µm/px:
512 px cells of synthetic H&E (some all tumour) on white glass, covering about --tissue of the
slide in irregular blobs. Only the tissue cells are stored (a memmap of cells), so even a
100k x 100k slide is generated on a small disk. Then runs `ikdmil predict` on it in a child process
with a random-init model of the requested backbone and input size (the compute of a trained one),
sampling the memory of the child and its tile-reading workers every 0.1 s. Each configuration of
--configs (predict settings: `torch` is the previous release's path) runs in its own child on the same slide.

Prints one JSON line per configuration: tiles, tiles/s, tissue megapixels/s (level 0 and at the
model's resolution), slides per hour for a standard Camelyon-like slide (100k x 100k px at this
--mpp, 30 % tissue), the model's achieved GFLOP/s beside this CPU's measured fp32 matmul peak (and
the slide-throughput limit that peak implies), the ratio to the first configuration, seconds, peak
memory of the child and its workers (proportional set size: total, anonymous, and file-backed =
memory-mapped output maps and libraries), the level-0 RGB size for comparison, and the device.

    python benchmarks/wsi.py                                  # 20480 x 20480 px at 0.25 µm/px, CPU or GPU
    python benchmarks/wsi.py --size 100000 --tissue 0.004     # a 100k x 100k slide: the memory bound
    python benchmarks/wsi.py --device cpu --batch-size 8 --workers 2
    python benchmarks/wsi.py --configs torch,onnxruntime     # two of the configurations
    python benchmarks/wsi.py --smoke                          # a 1024 px slide, 64 px tiles: seconds (tests run it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CELL = 512
TILE = 256
GLASS = 242
STANDARD_SLIDE_TISSUE_MPX = 100_000 * 100_000 * 0.30 / 1e6  # Camelyon-like: 100k x 100k px, 30 % tissue
CONFIGS = {  # PredictSettings overrides per configuration; "torch" is the path of the previous release
    "torch": {"backend": "torch"},
    "torch-large-tiles": {"backend": "torch", "large_tiles": True},
    "onnxruntime": {"backend": "onnxruntime"},
    "onnxruntime-large-tiles": {"backend": "onnxruntime", "large_tiles": True},
    "default": {},
}


def _tissue_cells(n: int, fraction: float, seed: int) -> np.ndarray:
    """(n, n) bool: irregular blobs covering about `fraction` of the cells (quantile of smooth noise)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma=max(1.0, n / 12), mode="wrap")
    thr = np.quantile(noise, 1 - fraction)
    return noise > thr


def generate_slide(path: Path, size: int, mpp: float, tissue: float, seed: int = 0) -> dict:
    from PIL import Image

    from ikdmil.prepare.synth import synth_image

    n = math.ceil(size / CELL)
    cells = _tissue_cells(n, tissue, seed)
    idx = -np.ones((n, n), np.int64)
    coords = np.argwhere(cells)
    idx[cells] = np.arange(len(coords))
    store = np.lib.format.open_memmap(path.with_suffix(".cells.npy"), "w+", np.uint8,
                                      (max(1, len(coords)), CELL, CELL, 3))
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for k, (_r, _c) in enumerate(coords):
        store[k] = synth_image(rng, CELL, 1.0 if rng.random() < 0.25 else 0.0)[0]
    store.flush()
    gen_s = time.perf_counter() - t0

    def cell_at(level: int, r: int, c: int) -> np.ndarray | None:
        if r >= n or c >= n or idx[r, c] < 0:
            return None
        img = store[idx[r, c]]
        return img if level == 0 else np.asarray(Image.fromarray(img).reduce(2 ** level))

    def tiles(level: int, shape):
        h, w = shape[:2]
        span = TILE * 2 ** level  # level-0 px per tile
        cs = CELL >> level  # cell size at this level
        for ty in range(math.ceil(h / TILE)):
            for tx in range(math.ceil(w / TILE)):
                tile = np.full((TILE, TILE, 3), GLASS, np.uint8)
                if cs >= TILE:
                    r, c = ty * span // CELL, tx * span // CELL
                    cell = cell_at(level, r, c)
                    if cell is not None:
                        oy, ox = (ty * span % CELL) >> level, (tx * span % CELL) >> level
                        tile[:] = cell[oy:oy + TILE, ox:ox + TILE]
                else:
                    per = TILE // cs
                    for i in range(per):
                        for j in range(per):
                            cell = cell_at(level, ty * per + i, tx * per + j)
                            if cell is not None:
                                tile[i * cs:(i + 1) * cs, j * cs:(j + 1) * cs] = cell
                # level-0 pixels beyond the slide are cropped by the TIFF shape; keep them glass-coloured
                yield tile

    t1 = time.perf_counter()
    _write_levels(path, size, mpp, tiles)
    path.with_suffix(".cells.npy").unlink()
    info = {"size": size, "mpp": mpp, "tissue_cells": int(cells.sum()), "cells": n * n,
            "tissue_fraction": round(float(cells.mean()), 4), "render_s": round(gen_s, 1),
            "write_s": round(time.perf_counter() - t1, 1), "file_mb": round(path.stat().st_size / 2**20, 1)}
    path.with_suffix(".json").write_text(json.dumps(info))
    return info


def _write_levels(path: Path, size: int, mpp: float, tiles) -> None:
    """A consecutive-IFD pyramid (halving down to <= 2048 px) from `tiles(level, shape)`, written atomically."""
    import tifffile

    levels = []
    w = size
    while True:
        levels.append(w)
        if w <= 2048 or len(levels) > 9:
            break
        w = (w + 1) // 2
    tmp = path.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, lw in enumerate(levels):
            shape = (lw, lw, 3)
            tw.write(tiles(k, shape), shape=shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="zlib", compressionargs={"level": 1}, subfiletype=1 if k else 0,
                     resolution=(1e4 / (mpp * 2 ** k), 1e4 / (mpp * 2 ** k)), resolutionunit="CENTIMETER",
                     metadata=None)
    os.replace(tmp, path)


def _tree_memory(pid: int) -> dict[str, int]:
    """Proportional set size (kB; shared pages split between sharers, so forked workers are not counted
    twice) of a process and its descendants: Pss, Pss_Anon, Pss_File (memory-mapped files)."""
    pids = [pid]
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except (OSError, ValueError):
        pass
    tot = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0}
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                key = line.split(":")[0]
                if key in tot:
                    tot[key] += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return tot


CHILD = r"""
import json, sys, time, torch
from ikdmil.inference import PredictSettings, predict
args = json.loads(sys.argv[1])
s = PredictSettings(batch_size=args["batch_size"], workers=args["workers"], device=args["device"], overwrite=True,
                    **args["settings"])
rep = predict(args["model"], [args["slide"]], args["out"], s, progress=False, echo=lambda *a: None)
extra = {}
if torch.cuda.is_available() and rep.slides and rep.slides[0]["device"].startswith("cuda"):
    extra["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    extra["gpu"] = torch.cuda.get_device_name()
print("RESULT " + json.dumps({"slides": rep.slides, "failures": rep.failures, "threads": torch.get_num_threads(),
                              **extra}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=None, help="slide side in level-0 px (default 20480; --smoke: 1024)")
    p.add_argument("--mpp", type=float, default=0.25, help="slide resolution (0.25 = 40x)")
    p.add_argument("--tissue", type=float, default=None, help="share of the slide covered by tissue (default 0.3)")
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--input-size", type=int, default=None, help="model input = tile size (default 256; --smoke: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    p.add_argument("--workers", type=int, default=-1, help="tile-reading processes (-1: automatic)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=None, help="folder for the generated slide and outputs (default: a temp folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=None,
                   help=f"comma-separated predict configurations, from {', '.join(CONFIGS)}; ratios are to the "
                        f"first (default: all but `default`, which is one of them; --smoke: default)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run that checks the benchmark works (seconds; figures mean nothing); "
                        "a fresh temp folder unless --work")
    args = p.parse_args(argv)
    args.configs = args.configs or ("default" if args.smoke else ",".join(c for c in CONFIGS if c != "default"))
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    smoke = {"size": 1024, "tissue": 0.5, "input_size": 64} if args.smoke else {}
    full = {"size": 20480, "tissue": 0.3, "input_size": 256}
    for key, value in full.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke.get(key, value))
    if args.smoke and args.work is None:
        with tempfile.TemporaryDirectory(prefix="ikdmil-wsi-smoke-") as work:
            return run(args, Path(work))
    return run(args, Path(args.work) if args.work else Path(tempfile.gettempdir()) / "ikdmil-wsi-bench")


def run(args: argparse.Namespace, work: Path) -> int:
    """Generate (or reuse) the slide under `work`, predict it in a child process, print one JSON line."""
    import torch
    from timing import matmul_peak_gflops  # benchmarks/timing.py

    from ikdmil.models import create_model
    from ikdmil.models.checkpoint import save_model

    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"slide-{args.size}-{args.mpp}-{args.tissue}-{args.seed}.tif"
    gen = (json.loads(slide.with_suffix(".json").read_text())
           if slide.is_file() and slide.with_suffix(".json").is_file() else None)
    if gen is None:
        gen = generate_slide(slide, args.size, args.mpp, args.tissue, args.seed)
    torch.manual_seed(args.seed)
    model, _ = create_model(args.backbone, pretrained="none")
    model_file = save_model(model, work / f"{args.backbone}-{args.input_size}.safetensors", input_size=args.input_size)
    machine = {"fp32_matmul_gflops": round(matmul_peak_gflops(), 1), "gflop_per_model_mpx": _gflop_per_mpx(model)}
    first = None
    for name in args.configs.split(","):
        child_args = {"model": str(model_file), "slide": str(slide), "out": str(work / "out" / name),
                      "batch_size": args.batch_size, "workers": args.workers, "device": args.device,
                      "settings": CONFIGS[name]}
        code, out, peak, wall = _run_child(child_args)
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        if code or line is None:
            print(out, file=sys.stderr)
            return 1
        res = json.loads(line[len("RESULT "):])
        if res["failures"]:
            print(json.dumps(res["failures"]), file=sys.stderr)
            return 1
        row = {"config": name, **_result(args, res, peak, wall, gen, machine)}
        rate = res["slides"][0]["tissue"]["area_mm2"] / res["slides"][0]["seconds"]  # unrounded
        first = first or rate
        row["vs_first"] = round(rate / max(first, 1e-12), 3)
        print(json.dumps(row), flush=True)
    return 0


def _gflop_per_mpx(model) -> float:
    """Forward GFLOP per megapixel of model input (a conv net's cost is linear in its pixels)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, TILE, TILE, dtype=torch.uint8))
    return round(counter.get_total_flops() / 1e9 / (TILE * TILE / 1e6), 2)


def _run_child(child_args: dict) -> tuple[int, str, dict[str, int], float]:
    """(exit code, stdout, peak memory in kB, wall seconds) of `predict` in a child process, sampled every 0.1 s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(child_args)], stdout=subprocess.PIPE, text=True)
    peak = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            for k, v in _tree_memory(proc.pid).items():
                peak[k] = max(peak[k], v)
            stop.wait(0.1)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    return proc.returncode, out, peak, time.perf_counter() - t0


def _result(args: argparse.Namespace, res: dict, peak: dict[str, int], wall: float, gen: dict, machine: dict) -> dict:
    """The JSON line: the child's slide summary turned into throughput, compute and memory figures."""
    s = res["slides"][0]
    tissue_mpx_l0 = s["tissue"]["area_mm2"] * 1e6 / (args.mpp ** 2) / 1e6
    tissue_mpx_model = tissue_mpx_l0 * (args.mpp / s["model_mpp"]) ** 2
    model_mpx = s["tiles"] * s["tile_size"] ** 2 / 1e6  # model pixels computed, overlaps included
    gflops = machine["gflop_per_model_mpx"] * model_mpx / max(s["inference_seconds"], 1e-9)
    limit_model = machine["fp32_matmul_gflops"] / machine["gflop_per_model_mpx"]  # model Mpx/s at the GEMM peak
    level0_rgb_mb = args.size * args.size * 3 / 2**20
    result = {
        "benchmark": "wsi-predict" + ("-smoke" if args.smoke else ""),
        "device": s["device"] if "gpu" not in res else f"{s['device']} ({res['gpu']})",
        "cpu_threads": res["threads"],
        "backbone": args.backbone,
        "tile": s["tile_size"], "overlap": s["overlap"], "batch_size": s["batch_size"], "workers": s["workers"],
        "slide_px": [args.size, args.size], "slide_mpp": args.mpp, "model_mpp": s["model_mpp"],
        "read_level": s["read_level"], "tissue_mm2": s["tissue"]["area_mm2"],
        "tiles": s["tiles"], "tiles_total": s["tiles_total"],
        "inference_s": s["inference_seconds"], "slide_s": s["seconds"], "wall_s": round(wall, 1),
        "tiles_per_s": s["tiles_per_second"],
        "tissue_mpx_per_s_level0": round(tissue_mpx_l0 / s["seconds"], 2),
        "tissue_mpx_per_s_model": round(tissue_mpx_model / s["seconds"], 2),
        "slides_per_hour_standard": round(3600 * tissue_mpx_l0 / s["seconds"] / STANDARD_SLIDE_TISSUE_MPX, 2),
        "model_gflops": round(gflops, 1), **machine,
        "limit_tissue_mpx_per_s_model": round(limit_model, 3),
        "of_limit": round(tissue_mpx_model / s["seconds"] / limit_model, 3),
        "computed_per_tissue_px": round(model_mpx / max(tissue_mpx_model, 1e-9), 2),
        "peak_mem_mb": round(peak["Pss"] / 1024, 1),
        "peak_mem_anon_mb": round(peak["Pss_Anon"] / 1024, 1),
        "peak_mem_file_mb": round(peak["Pss_File"] / 1024, 1),
        "level0_rgb_mb": round(level0_rgb_mb, 1),
        "output_map_px": s["output_size"],
        "output_maps_mb": round(2 * s["output_size"][0] * s["output_size"][1] / 2**20, 1),
        "generated": gen,
    }
    if "gpu_peak_mb" in res:
        result["gpu_peak_mb"] = res["gpu_peak_mb"]
    return result


if __name__ == "__main__":
    raise SystemExit(main())
