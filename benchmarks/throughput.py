"""Training throughput of stage 1 (MIL teacher) and stage 2 (distillation), images/s.

For each batch size, measured side by side in one run:
- `plain`: the straightforward path (NCHW memory, teacher run live on every batch in stage 2,
  DataLoader over the preprocessing cache);
- `fast`: the default path (channels_last, teacher maps cached once per cycle, training set held
  as uint8 on the device when it fits, bf16 autocast on CUDA; `--compile` adds torch.compile, in
  `--compile-mode`: default here; auto = reduce-overhead (CUDA graphs) on CUDA, as `ikdmil train --compile`).
Each is timed on steps only (a batch already on the device) and with data loading + augmentation.
Achieved TFLOP/s counts the model's real FLOPs (forward measured with FlopCounterMode, backward
taken as 2x forward); the fraction of peak uses the device's dense bf16 peak when known.
One JSON line per (stage, path, batch, loading).

    python benchmarks/throughput.py                         # CPU: batch 16, 128 px
    python benchmarks/throughput.py --size 256 --batches 16 256 --images 4096 --compile   # GPU
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from timing import timed  # benchmarks/timing.py
from torch.utils.flop_counter import FlopCounterMode

from ikdmil.config import COMPILE_MODES
from ikdmil.data.dataset import CachedArrays, PatchDataset
from ikdmil.device import compile_mode_for, fits_on_device, resolve_device
from ikdmil.engine.distill import TeacherTargets, freeze, make_distill_step, student_optimizer
from ikdmil.engine.loop import Augmenter, BatchMeta, MemoryLoader, make_loader
from ikdmil.engine.teacher import make_teacher_step, teacher_optimizer
from ikdmil.models import create_model

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense tensor-core peaks


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def forward_flops(model, size: int, device) -> float:
    x = torch.zeros(1, 3, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def build(backbone: str, device, fast: bool, compile_mode: str | None):
    """The model on `device`; compiled in `compile_mode` (a RunConfig.compile_mode) on the fast path."""
    torch.manual_seed(0)
    model, _ = create_model(backbone, pretrained="none")
    fmt = torch.channels_last if fast else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    if compile_mode is None or not fast:
        return model
    return torch.compile(model, mode=compile_mode_for(compile_mode, device))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--size", type=int, default=None, help="input size (default 256 on GPU, 128 on CPU)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default: 16 and 256 on GPU, 16 on CPU")
    p.add_argument("--images", type=int, default=None, help="training-set size for the loading runs")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the plain path on GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode: default | reduce-overhead (CUDA graphs: no launch overhead at small "
                        "batches) | max-autotune | ...; auto: as ikdmil train (reduce-overhead on CUDA)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    size = args.size or (256 if gpu else 128)
    batches = args.batches or ([16, 256] if gpu else [16])
    steps = args.steps or (30 if gpu else 3)
    amp = gpu
    peak = peak_tflops(device)
    flops_fwd = forward_flops(build(args.backbone, device, False, None), size, device) / 1.0
    compile_mode = args.compile_mode if args.compile else None
    base = {"benchmark": "throughput", "backbone": args.backbone, "size": size, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if gpu else "cpu",
            "threads": torch.get_num_threads(), "gflop_forward_per_image": round(flops_fwd / 1e9, 2)}

    for batch in batches:
        n_images = args.images or max(batch * (steps + args.warmup + 1), 64)
        rng = np.random.default_rng(0)
        arrays = CachedArrays(images=rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8),
                              masks=np.zeros((n_images, size, size), bool),
                              labels=(np.arange(n_images) % 2).astype(np.int64),
                              has_mask=np.ones(n_images, bool))
        for fast in (False, True):
            path = "fast" if fast else "plain"
            teacher = build(args.backbone, device, fast, compile_mode)
            student = build(args.backbone, device, fast, compile_mode)
            x = torch.from_numpy(arrays.images[:batch]).to(device).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=torch.channels_last if fast else torch.contiguous_format)
            y = torch.from_numpy(arrays.labels[:batch]).to(device)
            meta = BatchMeta(torch.arange(batch), None)
            augment = Augmenter(0, True)

            def loader():
                if fast and (gpu and fits_on_device(arrays.images.nbytes, device) or not gpu):
                    return MemoryLoader(arrays.images, arrays.labels, batch, 0, device)
                return make_loader(PatchDataset(arrays), batch, True, 0, args.workers if gpu else 0, device)[0]

            def loading_run(step):
                it = iter(loader())

                def one():
                    nonlocal it
                    try:
                        xb, yb, index = next(it)
                    except StopIteration:
                        it = iter(loader())
                        xb, yb, index = next(it)
                    xb, ops, host_ops = augment(xb.to(device, non_blocking=True))
                    torch.compiler.cudagraph_mark_step_begin()
                    step(xb, yb.to(device, non_blocking=True), BatchMeta(index, ops, host_ops=host_ops))
                return one

            opt = teacher_optimizer(teacher, 5e-5, 5e-4)
            t_step = make_teacher_step(teacher, opt, device, amp)
            targets = None
            for stage in ("stage1", "stage2"):
                if stage == "stage1":
                    step = t_step
                    flops_img = 3 * flops_fwd
                else:
                    freeze(teacher)
                    if fast:
                        targets = TeacherTargets(arrays.images, device, amp, batch)
                        targets.refresh(teacher)
                    sopt = student_optimizer(student, 5e-5, 5e-4)
                    step = make_distill_step(student, teacher, sopt, device, amp, 0.25, targets)
                    flops_img = 3 * flops_fwd + (0 if fast else flops_fwd)
                for loading in (False, True):
                    if gpu:
                        torch.cuda.reset_peak_memory_stats(device)
                    fn = loading_run(step) if loading else (lambda: (torch.compiler.cudagraph_mark_step_begin(),
                                                                      step(x, y, meta)))
                    secs = timed(fn, steps, args.warmup, device)
                    ips = batch * steps / secs
                    line = {**base, "stage": stage, "path": path, "batch": batch, "with_loading": loading,
                            "images_per_s": round(ips, 1), "tflops": round(ips * flops_img / 1e12, 3),
                            "fraction_of_peak": round(ips * flops_img / 1e12 / peak, 3) if peak else None,
                            "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if gpu else None, "amp_bf16": amp,
                            "compiled": compile_mode_for(compile_mode, device) if compile_mode and fast else False}
                    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
