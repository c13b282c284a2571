"""What every stage shares: augmentation, the epoch loop, logging, checkpoints."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ikdmil.data.scale import spread_starts
from ikdmil.device import Distributed, to_device
from ikdmil.errors import IkdmilError
from ikdmil.io import atomic_path, write_text
from ikdmil.stain import jitter_stains


def _dihedral_op(y: torch.Tensor, op: int) -> torch.Tensor:
    """One of the 8 flips/rot90s: bit 2 flips the width, bits 0-1 rotate by 90° that many times."""
    if op & 4:
        y = y.flip(-1)
    return torch.rot90(y, k=op & 3, dims=(-2, -1))


_TABLES: dict = {}


def _dihedral_table(size: int, device: torch.device, inverse: bool) -> torch.Tensor:
    """(8, size*size) int64: for each op, the flat source pixel of every output pixel (made once per size)."""
    key = (size, str(device), inverse)
    if key not in _TABLES:
        grid = torch.arange(size * size).view(size, size)
        ops = [_dihedral_op(grid, op).flatten() for op in range(8)]
        table = torch.stack([torch.argsort(o) for o in ops] if inverse else ops)
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def _permute_pixels(x: torch.Tensor, ops: torch.Tensor, inverse: bool) -> torch.Tensor:
    """`x` (B,C,S,S) with sample i's pixels moved by dihedral op ops[i], by one gather (no host sync)."""
    b, c, h, w = x.shape
    if h != w:
        raise ValueError(f"dihedral augmentation needs square images, got {h}x{w}")
    index = _dihedral_table(h, x.device, inverse)[to_device(ops, x.device)]  # (B, S*S)
    out = x.reshape(b, c, h * w).gather(2, index[:, None, :].expand(b, c, h * w)).view(b, c, h, w)
    if c > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)  # keep the batch's memory order
    return out


def dihedral(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips/rot90s per sample: ops[i] in 0..7 (bit 2 = transpose-like flip).

    A gather through a per-op pixel table rather than a loop over ops with `nonzero`, which waits
    for the GPU at every training step.
    """
    return _permute_pixels(x, ops, inverse=False)


def dihedral_inverse(y: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Undo `dihedral`: dihedral_inverse(dihedral(x, ops), ops) == x."""
    return _permute_pixels(y, ops, inverse=True)


class Augmenter:
    """Random dihedral augmentation and HED stain jitter (`ikdmil.stain.jitter_stains`, strength `stain`)
    from its own seeded generator (so resume reproduces them; at stain 0 nothing more is drawn)."""

    def __init__(self, seed: int, enabled: bool, stain: float = 0.0):
        self.enabled = enabled
        self.stain = stain
        self.gen = torch.Generator().manual_seed(seed + 7919)

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """The uint8 batch with each image's stains jittered on its device; x itself at strength 0."""
        return jitter_stains(x, self.stain, self.gen)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Augmented batch and the op drawn per sample, on x's device and on the host (None, None when
        disabled), so that targets cached for the un-augmented images can be transformed identically."""
        if not self.enabled:
            return x, None, None
        host = torch.randint(0, 8, (x.shape[0],), generator=self.gen)
        ops = to_device(host, x.device)
        return dihedral(x, ops), ops, host


#: training crop origins lie at most input_size // CROP_GRID px apart (a grid, so that the teacher's map
#: of a crop can be cached per crop position: `ikdmil.engine.distill.TeacherTargets`)
CROP_GRID = 8


class Cropper:
    """Random square crops of `size` px of each canvas image (`ikdmil.data.dataset`), from its own
    seeded generator (so resume reproduces them).

    An image's crop origins are a grid (`spread_starts`, at most size / CROP_GRID apart, the last flush
    with the image's end); a crop is drawn uniformly among its image's positions. A crop never leaves
    the image where the image is at least `size` long, so white canvas padding enters a crop only along
    a side where the image itself is shorter than `size`; the losses then see it as the image's
    background (it is not masked out: the MIL target of a positive covers it, as it covers an image's
    own white lumen and glass). `views` is the largest number of positions of any image; position p of
    an image is `iy * nx + ix`.
    """

    def __init__(self, sizes: np.ndarray, size: int, seed: int):
        step = max(1, size // CROP_GRID)
        self.size = size
        self.starts = [(spread_starts(int(h), size, step), spread_starts(int(w), size, step)) for h, w in sizes]
        self.views = max((len(ys) * len(xs) for ys, xs in self.starts), default=1)
        self.gen = torch.Generator().manual_seed(seed + 104723)

    def offsets(self, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """(B,2) crop origins (y, x) of positions `view` of images `index`."""
        out = []
        for i, v in zip(index.tolist(), view.tolist()):
            ys, xs = self.starts[i]
            out.append((ys[v // len(xs)], xs[v % len(xs)]))
        return torch.tensor(out, dtype=torch.long).view(-1, 2)

    def draw(self, index: torch.Tensor) -> torch.Tensor:
        """A random crop position per image of `index`."""
        counts = torch.tensor([len(self.starts[i][0]) * len(self.starts[i][1]) for i in index.tolist()])
        return (torch.rand(len(counts), generator=self.gen) * counts).long().clamp(max=counts - 1)

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(crops (B,C,size,size), positions (B,), origins (B,2)) of the canvas batch x of rows `index`."""
        view = self.draw(index)
        offsets = self.offsets(index, view)
        return crop_batch(x, offsets, self.size), view, offsets


def crop_batch(x: torch.Tensor, offsets: torch.Tensor | None, size: int) -> torch.Tensor:
    """The (B,C,size,size) windows of (B,C,H,W) `x` at `offsets` (B,2) (y, x); x itself when it is
    already size x size."""
    if x.shape[-2:] == (size, size):
        return x
    return torch.stack([x[i, :, y:y + size, x0:x0 + size] for i, (y, x0) in enumerate(offsets.tolist())])


@dataclass
class BatchMeta:
    """Which dataset rows a batch holds (host tensor), which crop of each (position `view`, canvas origin
    `offsets`) and how each was augmented (`ops`, on the batch's device)."""

    index: torch.Tensor
    ops: torch.Tensor | None
    view: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    host_ops: torch.Tensor | None = None  # `ops` on the host, for bookkeeping that must not wait for the GPU
    # the batch before stain jitter (None: no jitter): stage 2's teacher sees it, so its cached maps stay
    # exact per (image, crop, view) and the student learns to match them whatever the stain
    plain: torch.Tensor | None = None

    def ops_on_host(self) -> torch.Tensor | None:
        """The ops as a host tensor (copied from the device only when the caller did not give `host_ops`)."""
        if self.ops is None or self.host_ops is not None:
            return self.host_ops
        return self.ops.cpu()


#: a training step: (images, labels, batch meta) -> its losses as detached 0-dim tensors (batch means) on
#: the device, never read on the host per step; it does forward, backward and update
Step = Callable[[torch.Tensor, torch.Tensor, BatchMeta | None], dict[str, torch.Tensor]]

#: training steps between progress-bar updates of the running loss (each update reads it from the device)
PROGRESS_EVERY = 25


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, workers: int, device: torch.device,
                dist: Distributed | None = None):
    """Shuffling loader; under torchrun a DistributedSampler gives each rank its own shard
    (--batch-size is per process) and is reshuffled by `set_loader_epoch`."""
    gen = torch.Generator().manual_seed(seed)
    sampler = None
    if dist is not None and dist.world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank,
                                                      shuffle=shuffle, seed=seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        generator=gen,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=False,
    )
    return loader, gen


class MemoryLoader:
    """The whole training set as one uint8 tensor on the device (the GPU when it fits), batched by
    index from a seeded permutation: no per-item Python, no host-to-device copies per step.

    Under torchrun every rank draws the same permutation (same seed) and takes its own stride of it.
    Yields (uint8 B,3,S,S images, labels, dataset indices) like the DataLoader over PatchDataset.
    """

    def __init__(self, images, labels, batch_size: int, seed: int, device: torch.device,
                 dist: Distributed | None = None):
        x = torch.empty(images.shape, dtype=torch.uint8, device=device)  # (N,S,S,3)
        for start in range(0, len(images), 1024):  # chunked: host memory stays bounded
            x[start:start + 1024].copy_(torch.from_numpy(np.array(images[start:start + 1024])))
        self.images = x.permute(0, 3, 1, 2)  # NCHW view in channels_last memory order, no copy
        self.labels = torch.as_tensor(np.asarray(labels), device=device)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.dist = dist or Distributed()

    def _order(self) -> torch.Tensor:
        perm = torch.randperm(len(self.labels), generator=self.generator)
        if self.dist.world > 1:  # pad to a multiple of the world size like DistributedSampler
            pad = (-len(perm)) % self.dist.world
            perm = torch.cat([perm, perm[:pad]])[self.dist.rank::self.dist.world]
        return perm

    def __len__(self) -> int:
        n = -(-len(self.labels) // self.dist.world)
        return -(-n // self.batch_size)

    def __iter__(self):
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            on_device = to_device(index, self.images.device)
            yield self.images[on_device], self.labels[on_device], index


def set_loader_epoch(loader, epoch: int) -> None:
    if isinstance(getattr(loader, "sampler", None), torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)


def run_epoch(
    step: Step,
    loader,
    device: torch.device,
    augment: Augmenter,
    desc: str,
    progress: bool,
    crop: Cropper | None = None,
) -> dict[str, float]:
    """One pass over `loader` (canvas images): a random crop of each (`crop`), its augmentation, then
    `step(x, y, meta)`; returns the mean of each loss over the epoch's images (all ranks' under torchrun).

    `step` does forward/backward/update and returns its losses as device tensors; they are summed on
    the device, weighted by batch size, and read once at the end, so a step never waits for the GPU
    (the bar shows the running loss every `PROGRESS_EVERY` steps). A NaN or infinite loss at any step
    makes its sum non-finite: a one-line IkdmilError at the end of the epoch, before the caller logs or
    checkpoints it.
    """
    totals: dict[str, torch.Tensor] = {}
    n = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for i, (x, y, index) in enumerate(bar, 1):
        view = offsets = None
        if crop is not None:
            x, view, offsets = crop(x, index)
        plain, ops, host_ops = augment(x.to(device, non_blocking=True))
        x = augment.jitter(plain)
        y = y.to(device, non_blocking=True)
        torch.compiler.cudagraph_mark_step_begin()  # --compile-mode reduce-overhead: each step is a new graph replay
        losses = step(x, y, BatchMeta(index, ops, view, offsets, host_ops, None if x is plain else plain))
        b = x.shape[0]
        n += b
        for k, v in losses.items():
            weighted = v.detach().to(torch.float64) * b
            totals[k] = totals[k] + weighted if k in totals else weighted
        if progress and i % PROGRESS_EVERY == 0:
            bar.set_postfix(loss=f"{float(totals['loss']) / n:.4f}")
    return _epoch_means(totals, n, device, desc)


def _epoch_means(totals: dict[str, torch.Tensor], n: int, device: torch.device, desc: str) -> dict[str, float]:
    """The epoch's sums divided by its image count, summed over ranks first: the one host read of the epoch."""
    keys = sorted(totals)
    where = totals[keys[0]].device if keys else device
    t = torch.stack([totals[k] for k in keys] + [torch.tensor(float(n), dtype=torch.float64, device=where)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    *sums, count = t.tolist()
    for k, v in zip(keys, sums):
        if not math.isfinite(v):
            what = "loss" if k == "loss" else f"loss {k!r}"
            raise IkdmilError(f"{desc}: {what} became {v}; lower --lr or check the input images")
    return {k: v / max(count, 1) for k, v in zip(keys, sums)}


#: metrics.csv columns that come first, in this order, when any row has them (others follow as they appear)
LEADING_COLUMNS = ("phase", "epoch", "loss", "val_f1", "val_auc", "val_score", "test_f1", "swap")


class MetricsLog:
    """Per-epoch rows in metrics.csv (rewritten atomically) and, if installed, TensorBoard."""

    def __init__(self, run_dir: Path, rows: list[dict] | None = None, write: bool = True):
        self.path = run_dir / "metrics.csv"
        self.rows = list(rows or [])
        self.write = write  # under torchrun only rank 0 writes
        self.tb = None
        if not write:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if not self.write:
            return
        seen: list[str] = []
        for r in self.rows:
            seen += [k for k in r if k not in seen]
        keys = [k for k in LEADING_COLUMNS if k in seen] + [k for k in seen if k not in LEADING_COLUMNS]
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
