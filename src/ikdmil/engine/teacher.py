"""Stage 1: the MIL teacher (pixels are instances, images are bags) and the fusion-weight fit.

Both steps take the stage-1 loss by name (`RunConfig.teacher_loss`): IKD's Dice ("dice") or the MIL
baselines' GeM-pooled BCE ("gem"), so a baseline teacher is trained exactly as its paper did.
"""

from __future__ import annotations

import torch

from ikdmil.device import autocast
from ikdmil.engine.loop import BatchMeta, Step
from ikdmil.losses import teacher_loss
from ikdmil.models.heads import MILOutput, MILSegmenter


def teacher_optimizer(model: MILSegmenter, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam over everything but the fusion weights, which stay uniform until the fusion fit."""
    model.fusion_logits.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if n != "fusion_logits"]
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def make_teacher_step(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device, amp: bool,
                      loss: str = "dice") -> Step:
    """Stage-1 step: the MIL loss named `loss` on every map of `model` (a MILSegmenter, maybe DDP-wrapped)."""
    loss_fn = teacher_loss(loss)

    def step(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta | None = None) -> dict[str, torch.Tensor]:
        model.train()
        with autocast(device, amp):
            out = model(x)
        value = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return {"loss": value.detach()}

    return step


def fusion_optimizer(model: MILSegmenter, lr: float) -> torch.optim.Optimizer:
    """Adam over the fusion logits only (three scalars: a larger lr than the network's)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.fusion_logits.requires_grad_(True)
    return torch.optim.Adam([model.fusion_logits], lr=lr)


def make_fusion_step(model: MILSegmenter, opt: torch.optim.Optimizer, device: torch.device, amp: bool,
                     loss: str = "dice") -> Step:
    """Fit w in f_w = sum softmax(w)_i f_i with the stage-1 loss on the fused map; the network is frozen."""
    loss_fn = teacher_loss(loss)

    def step(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta | None = None) -> dict[str, torch.Tensor]:
        model.eval()
        with torch.no_grad(), autocast(device, amp):
            sides = [torch.sigmoid(s).float() for s in model.side_logits(x)]
        value = loss_fn(MILOutput(sides=[], fused=model.fuse(sides)), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        return {"loss": value.detach()}

    return step
