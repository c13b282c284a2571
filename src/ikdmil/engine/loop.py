"""What every stage shares: device and autocast, augmentation, the epoch loop, logging, checkpoints."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ikdmil.data.io import atomic_path, write_text
from ikdmil.errors import IkdmilError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise IkdmilError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 on a laptop CPU is slower, not faster)."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def dihedral(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips/rot90s per sample: ops[i] in 0..7 (bit 2 = transpose-like flip)."""
    out = x.clone()
    for op in range(1, 8):
        sel = (ops == op).nonzero(as_tuple=True)[0]
        if sel.numel() == 0:
            continue
        y = x[sel]
        if op & 4:
            y = y.flip(-1)
        y = torch.rot90(y, k=op & 3, dims=(-2, -1))
        out[sel] = y
    return out


class Augmenter:
    """Random dihedral augmentation from its own seeded generator (so resume reproduces it)."""

    def __init__(self, seed: int, enabled: bool):
        self.enabled = enabled
        self.gen = torch.Generator().manual_seed(seed + 7919)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augmented batch and the op drawn per sample (None when disabled), so that targets
        cached for the un-augmented images can be transformed identically."""
        if not self.enabled:
            return x, None
        ops = torch.randint(0, 8, (x.shape[0],), generator=self.gen).to(x.device)
        return dihedral(x, ops), ops


@dataclass
class BatchMeta:
    """Which dataset rows a batch holds and how each was augmented."""

    index: torch.Tensor
    ops: torch.Tensor | None


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, workers: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=False,
    )
    return loader, gen


def run_epoch(
    step: Callable[..., dict[str, float]],
    loader,
    device: torch.device,
    augment: Augmenter,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """One pass over `loader`; `step(x, y, meta)` does forward/backward/update and returns its losses."""
    totals: dict[str, float] = {}
    n = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for x, y, index in bar:
        x, ops = augment(x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        losses = step(x, y, BatchMeta(index, ops))
        b = x.shape[0]
        n += b
        for k, v in losses.items():
            if not math.isfinite(v):
                raise IkdmilError(f"{desc}: loss became {v}; lower --lr or check the input images")
            totals[k] = totals.get(k, 0.0) + v * b
        bar.set_postfix(loss=f"{losses['loss']:.4f}")
    return {k: v / max(n, 1) for k, v in totals.items()}


class MetricsLog:
    """Per-epoch rows in metrics.csv (rewritten atomically) and, if installed, TensorBoard."""

    def __init__(self, run_dir: Path, rows: list[dict] | None = None):
        self.path = run_dir / "metrics.csv"
        self.rows = list(rows or [])
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        write_text(self.path, buf.getvalue())
        if self.tb is not None:
            step = len(self.rows)
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{row.get('phase', 'run')}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise IkdmilError(f"{path}: no checkpoint to resume from; start the run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise IkdmilError(f"{path}: cannot load checkpoint ({type(exc).__name__}); delete it and start again") from None


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
