"""Stage 1: the MIL teacher (pixels are instances, images are bags) and the fusion-weight fit."""

from __future__ import annotations

import torch

from ikdmil.engine.loop import autocast
from ikdmil.losses import dice_loss, mil_loss, mil_targets


def teacher_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam over everything but the fusion weights, which stay uniform until the fusion fit."""
    model.fusion_logits.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n != "fusion_logits"]
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def make_teacher_step(model, opt: torch.optim.Optimizer, device: torch.device, amp: bool):
    def step(x: torch.Tensor, y: torch.Tensor, meta=None) -> dict[str, float]:
        model.train()
        with autocast(device, amp):
            out = model(x)
        loss = mil_loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    return step


def fusion_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """Adam over the fusion logits only (three scalars: a larger lr than the network's)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.fusion_logits.requires_grad_(True)
    return torch.optim.Adam([model.fusion_logits], lr=lr)


def make_fusion_step(model, opt: torch.optim.Optimizer, device: torch.device, amp: bool):
    """Fit w in f_w = sum softmax(w)_i f_i with the MIL Dice on the fused map; the network is frozen."""

    def step(x: torch.Tensor, y: torch.Tensor, meta=None) -> dict[str, float]:
        model.eval()
        with torch.no_grad(), autocast(device, amp):
            sides = [torch.sigmoid(s).float() for s in model.side_logits(x)]
        w = model.fusion_weights
        fused = sum(wi * s for wi, s in zip(w, sides))
        loss = dice_loss(fused, mil_targets(y, fused), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    return step
