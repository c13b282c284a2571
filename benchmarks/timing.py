"""Shared by the benchmarks: wall time of repeated calls, synchronised with the GPU."""

from __future__ import annotations

import time

import torch


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
