"""IKD-MIL losses, batched (no per-sample Python loops), computed in float32.

- `dice_loss`: soft Dice per image, `1 - (2*sum(p*t) + eps) / (sum(p) + sum(t) + eps)`. For negative
  images prediction and target are flipped (`1 - p`, `1 - t`): the all-zero target would otherwise
  make Dice degenerate (its optimum would not depend on the prediction).
- `mil_loss` (stage 1): target all-ones on positives, all-zeros on negatives; Dice on the fused map
  plus every side map.
- `fusion_kd_loss` (stage 2): every student map (sides and fusion) pulled to the *teacher's fused
  map* on positives, to the zero mask on negatives. `kd_loss` names the KD structures of the
  paper's Fig. 2 (`RunConfig.kd_structure`): "fusion" (this one, IKD), "output" (Fig. 2a: only the
  student's fused map, to the teacher's fused map) and "block" (Fig. 2b: student side i to teacher
  side i, fused to fused); negatives always go to the zero mask.
- `weighted_ce`: cross-entropy between teacher fusion (soft target) and student fusion, with
  per-image pixel weights `softmax(-ce)` (computed without gradient) so that easy pixels count
  more and the teacher's noise is not amplified.
- `student_loss = fusion_kd_loss + a * weighted_ce` with a = 0.25. The weighting is
  `easy_example_weights` (online easy-example mining, OEEM), shared with the OEEM baseline, which
  applies it to the CE against CAM pseudo-masks; `bce_loss` and `dice_bce_loss` are the plain losses
  of the other comparison rows (`ikdmil.methods`).
- `gem_mil_loss` (the MIL baselines' teacher loss, `--teacher-loss gem`): each map is pooled to an
  image score by the generalised mean `(mean p^r)^(1/r)`, r = 4 (between mean and max pooling: a few
  confident pixels make a positive bag), then binary cross-entropy against the image label; summed
  over the fused map and every side map. `TEACHER_LOSSES` names the stage-1 losses.

Scale and weight decay: every loss is a *mean* over the batch (and a sum over maps). The authors'
code sums over the batch and uses weight decay 5e-5; ours is 5e-4 on means. Adam's step does not
depend on the scale of the loss, but the L2 term of Adam's weight decay is added to the gradient,
so its relative strength is (5e-4 / 1) / (5e-5 / B) = 10 * B: 160x the authors' at batch 16. A
weight decay of 5e-5 / B (3.1e-6 at batch 16) reproduces theirs; the experiment suite has that row.
"""

from __future__ import annotations

from collections.abc import Callable

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


def _kd_target(teacher_map: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's map on positives, the zero mask on negatives."""
    pos = (labels == 1).view(-1, 1, 1, 1)
    return torch.where(pos, teacher_map.float(), torch.zeros((), device=teacher_map.device))


def fusion_kd_loss(student: MILOutput, teacher_fused: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = _kd_target(teacher_fused, labels)
    return sum(dice_loss(m, target, labels) for m in student.all_maps())


KD_STRUCTURES = ("fusion", "output", "block")


def kd_loss(student: MILOutput, teacher: MILOutput, labels: torch.Tensor, structure: str = "fusion") -> torch.Tensor:
    """The stage-2 KD term for `structure` (see the module docstring); "block" needs teacher.sides."""
    if structure == "fusion":
        return fusion_kd_loss(student, teacher.fused, labels)
    if structure == "output":
        return dice_loss(student.fused, _kd_target(teacher.fused, labels), labels)
    if structure == "block":
        if len(teacher.sides) != len(student.sides):
            raise ValueError(f"block KD needs the teacher's {len(student.sides)} side maps, got {len(teacher.sides)}")
        pairs = zip(student.all_maps(), teacher.all_maps())
        return sum(dice_loss(s, _kd_target(t, labels), labels) for s, t in pairs)
    raise IkdmilError(f"--kd-structure {structure!r}: choose one of {', '.join(KD_STRUCTURES)}")


def pixel_bce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, H*W) per-pixel binary cross-entropy of probabilities `pred` against (soft) `target`, float32."""
    p = pred.float().clamp(PROB_CLAMP, 1.0 - PROB_CLAMP).flatten(1)
    t = target.float().flatten(1)
    return -(t * torch.log(p) + (1.0 - t) * torch.log1p(-p))


def easy_example_weights(pixel_loss: torch.Tensor) -> torch.Tensor:
    """Online easy-example mining: per image, the normalised softmax of minus each pixel's loss,
    `w_j = exp(-l_j) / sum_k exp(-l_k)` over the image's pixels (rows of a (B, P) loss), without
    gradient. Easy (low-loss) pixels count more, so noisy targets are not amplified."""
    return torch.softmax(-pixel_loss.detach().flatten(1), dim=1)


def easy_weighted(pixel_loss: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of `sum_j w_j l_j` with `w = easy_example_weights(l)`."""
    loss = pixel_loss.flatten(1)
    return (easy_example_weights(loss) * loss).sum(1).mean()


def weighted_ce(student_fused: torch.Tensor, teacher_fused: torch.Tensor) -> torch.Tensor:
    """Pixel-weighted BCE(teacher -> student), weights softmax(-ce) over each image's pixels: IKD's
    L_wce, and OEEM's loss with a pseudo-mask as the target (`ikdmil.methods.oeem`)."""
    return easy_weighted(pixel_bce(student_fused, teacher_fused))


def bce_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain per-pixel BCE, mean over pixels and batch (OAA's and PistoSeg's segmentation loss)."""
    return pixel_bce(pred, target).mean()


def dice_bce_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Soft Dice (flipped on negatives, see `dice_loss`) + mean BCE: the supervised reference's loss."""
    return dice_loss(pred, target, labels) + bce_loss(pred, target)


def student_loss(
    student: MILOutput,
    teacher: MILOutput | torch.Tensor,
    labels: torch.Tensor,
    wce_scale: float = 0.25,
    structure: str = "fusion",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_s = L_kd(structure) + a * L_wce(teacher fused -> student fused); `teacher` may be the fused map.

    The parts are detached 0-dim tensors on the loss's device (read by the epoch loop once per epoch).
    """
    if isinstance(teacher, torch.Tensor):
        teacher = MILOutput(sides=[], fused=teacher)
    kd = kd_loss(student, teacher, labels, structure)
    wce = weighted_ce(student.fused, teacher.fused)
    total = kd + wce_scale * wce
    return total, {"kd": kd.detach(), "wce": wce.detach()}
