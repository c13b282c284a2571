"""Cost of each registered backbone as a MIL model: size, FLOPs, training and inference speed.

Prints one JSON line per backbone: parameters, forward GFLOPs per image at --size (counted with
torch.utils.flop_counter.FlopCounterMode: convolutions and matrix products, 1 multiply-add = 2 FLOPs),
and images/s of the real stage-1 step (forward, Dice MIL loss, backward, Adam) and of inference.
Models run channels_last as in the pipeline; on CUDA under bf16 autocast, on CPU in float32. Random
init (weights do not change the cost); a warm-up iteration is not timed.

    python benchmarks/backbones.py                                 # every backbone, CPU, batch 2
    python benchmarks/backbones.py --device cuda                   # batch 16, 20 iterations, bf16
    python benchmarks/backbones.py --backbones resnet18 swin_t --size 224 --iters 5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from timing import timed  # benchmarks/timing.py
from torch.utils.flop_counter import FlopCounterMode

from ikdmil.device import autocast, resolve_device
from ikdmil.engine.teacher import make_teacher_step, teacher_optimizer
from ikdmil.models import available_backbones, create_model


def forward_gflops(model, size: int) -> float:
    """Forward GFLOPs for one image (float32 on CPU: the count does not depend on device or dtype)."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def images_per_second(run, batch: int, iters: int, warmup: int, device: torch.device) -> float:
    return batch * iters / timed(run, iters, warmup, device)


def bench(name: str, size: int, batch: int, iters: int, warmup: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model, _ = create_model(name, pretrained="none")
    row = {"backbone": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
           "gflops_fwd": round(forward_gflops(model, size), 2), "size": size}
    model = model.to(device, memory_format=torch.channels_last)
    x = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.arange(batch, device=device) % 2).long()
    cuda = device.type == "cuda"  # bf16 autocast there, as the pipeline trains
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step = make_teacher_step(model, teacher_optimizer(model, lr=1e-5, weight_decay=0.0), device, cuda)
    row["train_img_s"] = round(images_per_second(lambda: step(x, y), batch, iters, warmup, device), 2)
    model.eval()

    def infer():
        with torch.inference_mode(), autocast(device, cuda):
            model(x)

    row["infer_img_s"] = round(images_per_second(infer, batch, iters, warmup, device), 2)
    if cuda:
        row["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row.update(device=str(device), dtype="bf16-autocast" if cuda else "fp32", batch=batch, iters=iters,
               threads=torch.get_num_threads(), torch=torch.__version__,
               host=torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=None, help="default: all registered")
    p.add_argument("--size", type=int, default=256, help="input size (the paper's 256)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 2 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default: 1 on CPU, 3 on CUDA)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (16 if cuda else 2)
    iters = args.iters or (20 if cuda else 2)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    names = args.backbones or available_backbones()
    unknown = sorted(set(names) - set(available_backbones()))
    if unknown:
        p.error(f"unknown backbone(s) {', '.join(unknown)}; choose from {', '.join(available_backbones())}")
    for name in names:
        print(json.dumps(bench(name, args.size, batch, iters, warmup, device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
