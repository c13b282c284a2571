"""CPU inference backends side by side: the fused map of the same tiles through each, timed and compared.

Backends (each skipped, with the reason in its JSON line, when it is not installed or fails):
- `eager`: PyTorch, fp32, NCHW;
- `channels_last`: PyTorch, fp32, channels-last memory (what `ikdmil predict` runs today);
- `compile`: `torch.compile` (inductor) of the channels-last model;
- `onnxruntime`: the model exported to ONNX, run by ONNX Runtime's CPU provider;
- `openvino`: the same ONNX file compiled by OpenVINO for the CPU (fp32 inference precision).

Every backend sees the same uint8 tiles (random H&E-like colours of a fixed seed) and must give the
channels-last map within --tolerance (max absolute difference of probabilities), else its line says
`"equal": false`. One JSON line per (backend, shape): images/s, model Mpx/s, the model's achieved
GFLOP/s (FLOPs counted by FlopCounterMode), and the ratio to `channels_last`; first a line with this
machine's measured fp32 matmul peak, so the GFLOP/s can be read against it.

    python benchmarks/backends.py                                  # vgg16, 256 px x 4 and 1024 px x 1
    python benchmarks/backends.py --shapes 256x4 --backends channels_last,onnxruntime --steps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from timing import matmul_peak_gflops, timed  # benchmarks/timing.py
from torch.utils.flop_counter import FlopCounterMode

from ikdmil.inference.onnx_backend import FusedMap
from ikdmil.models import create_model

BACKENDS = ("eager", "channels_last", "compile", "onnxruntime", "openvino")


def tiles(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """H&E-like uint8 tiles: pink/purple noise, smooth enough that the maps are not constant."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([200.0, 120.0, 190.0]).view(1, 3, 1, 1)
    noise = torch.nn.functional.avg_pool2d(torch.randn(batch, 3, size, size, generator=g) * 120, 9, 1, 4)
    return (base + noise).clamp(0, 255).to(torch.uint8)


def onnx_file(net: torch.nn.Module, x: torch.Tensor, folder: Path) -> Path:
    """`net` exported for tiles of x's size. A copy is exported each time: a second export of the same
    module in one process was measured to give a wrong graph (max |diff| 0.24 at 1024 px after 256 px)."""
    path = folder / f"fused-{x.shape[2]}.onnx"
    if not path.is_file():
        torch.onnx.export(copy.deepcopy(net), (x,), str(path), input_names=["tiles"], output_names=["fused"],
                          dynamic_axes={"tiles": {0: "batch"}, "fused": {0: "batch"}}, dynamo=False)
    return path


def runner(name: str, net: torch.nn.Module, x: torch.Tensor, folder: Path):
    """A no-argument callable returning the fused map of `x` as a numpy array, for backend `name`."""
    if name == "eager":
        return lambda: net(x).numpy()
    xc = x.contiguous(memory_format=torch.channels_last)
    if name == "channels_last":
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)  # `net` itself stays NCHW for eager
        return lambda: cl(xc).numpy()
    if name == "compile":
        compiled = torch.compile(copy.deepcopy(net).to(memory_format=torch.channels_last))
        return lambda: compiled(xc).numpy()
    path, feed = onnx_file(net, x, folder), x.numpy()
    if name == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"tiles": feed})[0]
    if name == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return lambda: compiled(feed)[0]
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def measure(args: argparse.Namespace, net: torch.nn.Module, size: int, batch: int, folder: Path) -> list[dict]:
    x = tiles(batch, size, args.seed)
    with FlopCounterMode(display=False) as counter:
        net(x[:1])
    gflop_per_image = counter.get_total_flops() / 1e9
    reference = runner("channels_last", net, x, folder)()
    rows, base_ips = [], None
    for name in args.backends.split(","):
        row = {"benchmark": "cpu-backends", "backend": name, "backbone": args.backbone, "size": size, "batch": batch,
               "threads": torch.get_num_threads()}
        try:
            fn = runner(name, net, x, folder)
            out = fn()  # also the first warm-up (compilation happens here)
            seconds = timed(fn, args.steps, args.warmup, torch.device("cpu"))
        except Exception as exc:  # noqa: BLE001 - a backend that fails is reported, the others still run
            rows.append({**row, "skipped": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
            continue
        ips = args.steps * batch / seconds
        diff = float(np.abs(np.asarray(out, np.float32).reshape(reference.shape) - reference).max())
        base_ips = ips if name == "channels_last" else base_ips
        rows.append({**row, "images_per_s": round(ips, 2), "model_mpx_per_s": round(ips * size * size / 1e6, 3),
                     "gflop_per_image": round(gflop_per_image, 2), "gflops": round(ips * gflop_per_image, 1),
                     "max_abs_diff": diff, "equal": diff <= args.tolerance})
    for row in rows:
        if base_ips and "images_per_s" in row:
            row["vs_channels_last"] = round(row["images_per_s"] / base_ips, 3)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--shapes", default="256x4,1024x1", help="comma-separated SIZExBATCH tiles")
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, from {', '.join(BACKENDS)}")
    p.add_argument("--steps", type=int, default=10, help="timed calls per backend and shape")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |p - p_channels_last| to count as equal")
    p.add_argument("--threads", type=int, default=0, help="torch / runtime threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*|ikdmil.*")  # the exporter's tracer notes
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    print(json.dumps({"benchmark": "cpu-matmul-peak", "threads": torch.get_num_threads(),
                      "fp32_gflops": round(matmul_peak_gflops(), 1)}), flush=True)
    torch.manual_seed(args.seed)
    model, _ = create_model(args.backbone, pretrained="none")
    net = FusedMap(model.eval())
    with tempfile.TemporaryDirectory(prefix="ikdmil-backends-") as tmp, torch.no_grad():
        for shape in args.shapes.split(","):
            size, batch = (int(v) for v in shape.lower().split("x"))
            for row in measure(args, net, size, batch, Path(tmp)):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
