"""Stage 2: iterative fusion-knowledge distillation with teacher/student role swaps."""

from __future__ import annotations

import copy

import torch

from ikdmil.engine.loop import autocast
from ikdmil.losses import student_loss


def freeze(model) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(model) -> None:
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)


def student_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    unfreeze(model)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


def make_distill_step(student, teacher, opt: torch.optim.Optimizer, device: torch.device, amp: bool,
                      wce_scale: float):
    """The teacher is frozen and runs under no_grad; only the student learns."""

    def step(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
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


def swap_roles(teacher, student) -> None:
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
