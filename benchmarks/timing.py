"""Shared by the benchmarks: wall time of repeated calls (synchronised with the GPU), the fp32 GEMM peak."""

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


def matmul_peak_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    """Best-of fp32 GEMM rate on this CPU (GFLOP/s): the ceiling a conv net's forward pass can approach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best
