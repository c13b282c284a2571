"""Where code runs: torchrun process groups, device choice, autocast and device memory checks.

Shared by training and inference, so neither borrows it from the other.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ikdmil.errors import IkdmilError


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (any picklable object; waits as long as `OBJECT_WAIT`)."""
        if self.world <= 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, group=_object_group())
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the others); waits as long as `OBJECT_WAIT`."""
        if self.world <= 1:
            return [obj]
        found = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(obj, found, dst=0, group=_object_group())
        return found


#: how long a rank waits for the others in `Distributed.broadcast` / `gather`: ranks of a cohort
#: prediction finish their shares of slides hours apart, far beyond the default 10-30 min timeouts
OBJECT_WAIT = timedelta(days=7)
_OBJECT_GROUPS: dict = {}


def _object_group():
    """A gloo group for Python objects (CPU, long timeout) beside the default group, made once per process group.

    Every rank makes it at its first `broadcast` / `gather`, which all ranks reach in the same order.
    """
    key = id(torch.distributed.group.WORLD)
    if key not in _OBJECT_GROUPS:
        _OBJECT_GROUPS[key] = torch.distributed.new_group(backend="gloo", timeout=OBJECT_WAIT)
    return _OBJECT_GROUPS[key]


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank), device


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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without waiting for the GPU: host tensors are pinned first, then copied asynchronously.

    A plain ``.to(cuda)`` of pageable memory waits for every queued kernel (a host sync); the training
    loop moves its small per-step tensors (dataset indices, augmentation ops) with this instead.
    """
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def compile_mode_for(mode: str, device: torch.device) -> str:
    """The torch.compile mode for `RunConfig.compile_mode` on `device`.

    auto: "reduce-overhead" on CUDA, which captures each training step's forward and backward in CUDA
    graphs (at the paper's batch 16 the GPU otherwise waits on kernel launches), and "default" on
    CPU, where CUDA graphs do not exist. Asked for on CPU, the CUDA-graph modes fall back to their
    graph-free forms, so a CPU run of a GPU config still trains.
    """
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "default"
    if device.type != "cuda":
        return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
    return mode


def fits_on_device(nbytes: int, device: torch.device, share: float = 0.4) -> bool:
    """Whether `nbytes` fit in `share` of the GPU's free memory (False on CPU)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes < share * free


def all_reduce_mean(grad: torch.Tensor) -> torch.Tensor:
    """Gradient hook: the mean of this tensor over all ranks."""
    grad = grad.clone()
    torch.distributed.all_reduce(grad)
    return grad / torch.distributed.get_world_size()
