"""IKD-MIL losses, batched (no per-sample Python loops), computed in float32.

- `dice_loss`: soft Dice per image, `1 - (2*sum(p*t) + eps) / (sum(p) + sum(t) + eps)`. For negative
  images prediction and target are flipped (`1 - p`, `1 - t`): the all-zero target would otherwise
  make Dice degenerate (its optimum would not depend on the prediction).
- `mil_loss` (stage 1): target all-ones on positives, all-zeros on negatives; Dice on the fused map
  plus every side map.
- `fusion_kd_loss` (stage 2): every student map (sides and fusion) pulled to the *teacher's fused
  map* on positives, to the zero mask on negatives.
- `weighted_ce`: cross-entropy between teacher fusion (soft target) and student fusion, with
  per-image pixel weights `softmax(-ce)` (computed without gradient) so that easy pixels count
  more and the teacher's noise is not amplified.
- `student_loss = fusion_kd_loss + a * weighted_ce` with a = 0.25.
- `gem_mil_loss` (the MIL baselines' teacher loss, `--teacher-loss gem`): each map is pooled to an
  image score by the generalised mean `(mean p^r)^(1/r)`, r = 4 (between mean and max pooling: a few
  confident pixels make a positive bag), then binary cross-entropy against the image label; summed
  over the fused map and every side map. `TEACHER_LOSSES` names the stage-1 losses.
"""

from __future__ import annotations

from typing import Callable

import torch

from ikdmil.errors import IkdmilError
from ikdmil.models.heads import MILOutput

EPS = 1.0  # Dice smoothing, in pixels
PROB_CLAMP = 1e-6
GEM_POWER = 4.0  # r of the generalised-mean pooling in the baselines' MIL loss


def dice_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the (flipped-on-negatives) soft Dice loss. pred/target (B,1,H,W)."""
    pred = pred.float()
    target = target.float()
    neg = (labels == 0).view(-1, 1, 1, 1)
    p = torch.where(neg, 1.0 - pred, pred).flatten(1)
    t = torch.where(neg, 1.0 - target, target).flatten(1)
    inter = (p * t).sum(1)
    dice = (2.0 * inter + EPS) / (p.sum(1) + t.sum(1) + EPS)
    return (1.0 - dice).mean()


def mil_targets(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """All-ones maps for positive images, all-zeros for negatives."""
    return labels.float().view(-1, 1, 1, 1).expand_as(like)


def mil_loss(out: MILOutput, labels: torch.Tensor) -> torch.Tensor:
    target = mil_targets(labels, out.fused)
    return sum(dice_loss(m, target, labels) for m in out.all_maps())


def gem_pool(pred: torch.Tensor, r: float = GEM_POWER) -> torch.Tensor:
    """(B,1,H,W) probabilities -> (B,) image scores `(mean p^r)^(1/r)`, in float32.

    p is clamped away from 0 so that the r-th root has a finite gradient on an all-zero map.
    """
    return pred.float().clamp(PROB_CLAMP, 1.0).pow(r).flatten(1).mean(1).pow(1.0 / r)


def gem_bce(pred: torch.Tensor, labels: torch.Tensor, r: float = GEM_POWER) -> torch.Tensor:
    """Mean over the batch of BCE(gem_pool(pred), label)."""
    s = gem_pool(pred, r).clamp(PROB_CLAMP, 1.0 - PROB_CLAMP)
    y = labels.float().view(-1)
    return -(y * torch.log(s) + (1.0 - y) * torch.log1p(-s)).mean()


def gem_mil_loss(out: MILOutput, labels: torch.Tensor) -> torch.Tensor:
    return sum(gem_bce(m, labels) for m in out.all_maps())


#: stage-1 (teacher and fusion-fit) losses by `RunConfig.teacher_loss` name
TEACHER_LOSSES: dict[str, Callable[[MILOutput, torch.Tensor], torch.Tensor]] = {
    "dice": mil_loss,
    "gem": gem_mil_loss,
}


def teacher_loss(name: str) -> Callable[[MILOutput, torch.Tensor], torch.Tensor]:
    try:
        return TEACHER_LOSSES[name]
    except KeyError:
        raise IkdmilError(f"--teacher-loss {name!r}: choose one of {', '.join(TEACHER_LOSSES)}") from None


def fusion_kd_loss(student: MILOutput, teacher_fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    pos = (labels == 1).view(-1, 1, 1, 1)
    target = torch.where(pos, teacher_fused.float(), torch.zeros((), device=teacher_fused.device))
    return sum(dice_loss(m, target, labels) for m in student.all_maps())


def weighted_ce(student_fused: torch.Tensor, teacher_fused: torch.Tensor) -> torch.Tensor:
    """Pixel-weighted BCE(teacher -> student), weights softmax(-ce) over each image's pixels."""
    p = student_fused.float().clamp(PROB_CLAMP, 1.0 - PROB_CLAMP).flatten(1)
    t = teacher_fused.float().flatten(1)
    ce = -(t * torch.log(p) + (1.0 - t) * torch.log1p(-p))
    weights = torch.softmax(-ce.detach(), dim=1)
    return (weights * ce).sum(1).mean()


def student_loss(
    student: MILOutput, teacher_fused: torch.Tensor, labels: torch.Tensor, wce_scale: float = 0.25
) -> tuple[torch.Tensor, dict[str, float]]:
    kd = fusion_kd_loss(student, teacher_fused, labels)
    wce = weighted_ce(student.fused, teacher_fused)
    total = kd + wce_scale * wce
    return total, {"kd": float(kd.detach()), "wce": float(wce.detach())}
