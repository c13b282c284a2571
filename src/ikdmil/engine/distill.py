"""Stage 2: iterative fusion-knowledge distillation with teacher/student role swaps."""

from __future__ import annotations

import copy

import torch

from ikdmil.engine.evaluate import iter_fused
from ikdmil.device import autocast
from ikdmil.engine.loop import BatchMeta, Step, dihedral
from ikdmil.losses import student_loss
from ikdmil.models.heads import MILSegmenter


def freeze(model: MILSegmenter) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(model: MILSegmenter) -> None:
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)


def student_optimizer(model: MILSegmenter, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    unfreeze(model)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


class TeacherTargets:
    """The frozen teacher's fused maps for the whole training set, computed once per cycle.

    Within a cycle the teacher does not change, so one forward pass over the training set replaces
    one per batch per epoch. Maps are kept as float16 (on the GPU when they fit in a quarter of its
    free memory, else in host memory). Augmentation is applied to the cached map exactly as to the
    image (same dihedral op per sample): the target is `aug(teacher(x))` instead of the live
    `teacher(aug(x))`; set `teacher_cache: false` to run the teacher live on augmented images.
    """

    def __init__(self, images, device: torch.device, amp: bool, batch_size: int):
        self.images, self.device, self.amp, self.batch_size = images, device, amp, batch_size
        n, h, w = images.shape[:3]
        store = torch.device("cpu")
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            store = device if n * h * w * 2 < free // 4 else store
        self.maps = torch.empty((n, 1, h, w), dtype=torch.float16, device=store)
        if store.type == "cpu" and device.type == "cuda":
            self.maps = self.maps.pin_memory()

    def refresh(self, teacher: MILSegmenter) -> None:
        for start, fused in iter_fused(teacher, self.images, self.device, self.batch_size, self.amp,
                                       desc="teacher maps"):
            self.maps[start:start + len(fused)] = fused.to(self.maps.device, torch.float16)

    def __call__(self, meta: BatchMeta) -> torch.Tensor:
        target = self.maps[meta.index.to(self.maps.device)].to(self.device, non_blocking=True).float()
        return target if meta.ops is None else dihedral(target, meta.ops)


def make_distill_step(student: torch.nn.Module, teacher: MILSegmenter, opt: torch.optim.Optimizer,
                      device: torch.device, amp: bool, wce_scale: float,
                      targets: TeacherTargets | None = None) -> Step:
    """Only the student learns. The teacher's fused map comes from `targets` (cached per cycle) or,
    without a cache, from the frozen teacher run live under no_grad on the (augmented) batch."""

    def step(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta | None = None) -> dict[str, float]:
        if targets is not None:
            target = targets(meta)
        else:
            with torch.no_grad(), autocast(device, amp):
                target = teacher(x).fused.float()
        student.train()
        with autocast(device, amp):
            out = student(x)
        loss, parts = student_loss(out, target, y, wce_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach()), **parts}

    return step


def swap_roles(teacher: MILSegmenter, student: MILSegmenter) -> None:
    """The student becomes the frozen teacher and the old teacher becomes the student.

    Weights are exchanged by deep copies of the state dicts (never aliases), so afterwards the two
    models hold independent tensors: the new teacher exactly the former student's weights.
    """
    t_state = copy.deepcopy(teacher.state_dict())
    s_state = copy.deepcopy(student.state_dict())
    teacher.load_state_dict(s_state)
    student.load_state_dict(t_state)
    freeze(teacher)
    unfreeze(student)
