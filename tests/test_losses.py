"""Losses against values computed by hand."""

import math

import pytest
import torch

from ikdmil.losses import KD_STRUCTURES, dice_loss, fusion_kd_loss, kd_loss, mil_loss, student_loss, weighted_ce
from ikdmil.models.heads import MILOutput


def m(values):
    """(1,1,H,W) tensor from a nested list."""
    return torch.tensor(values, dtype=torch.float32)[None, None]


def test_dice_positive_by_hand():
    # one of four pixels predicted; target all ones: 1 - (2*1 + 1) / (1 + 4 + 1) = 0.5
    assert dice_loss(m([[1, 0], [0, 0]]), m([[1, 1], [1, 1]]), torch.tensor([1])).item() == pytest.approx(0.5)


def test_dice_flips_negatives():
    zeros, ones, lab0 = m([[0, 0], [0, 0]]), m([[1, 1], [1, 1]]), torch.tensor([0])
    # negative, empty prediction: flipped to all-ones vs all-ones -> perfect
    assert dice_loss(zeros, zeros, lab0).item() == pytest.approx(0.0)
    # negative, full prediction: flipped p = 0, t = 1 -> 1 - (0 + 1) / (0 + 4 + 1) = 0.8
    assert dice_loss(ones, zeros, lab0).item() == pytest.approx(0.8)
    # a half prediction on a negative: flipped p = 0.5 everywhere vs t = 1 -> 1 - (2*2 + 1) / (2 + 4 + 1)
    half = m([[0.5, 0.5], [0.5, 0.5]])
    assert dice_loss(half, zeros, lab0).item() == pytest.approx(1 - (2 * 2 + 1) / (2 + 4 + 1))


def test_dice_batch_mixes_labels():
    pred = torch.cat([m([[1, 0], [0, 0]]), m([[1, 1], [1, 1]])])
    target = torch.cat([m([[1, 1], [1, 1]]), m([[0, 0], [0, 0]])])
    assert dice_loss(pred, target, torch.tensor([1, 0])).item() == pytest.approx((0.5 + 0.8) / 2)


def test_mil_loss_sums_sides_and_fusion():
    p = m([[1, 0], [0, 0]])
    out = MILOutput(sides=[p, p], fused=p)
    assert mil_loss(out, torch.tensor([1])).item() == pytest.approx(3 * 0.5)


def test_fusion_kd_targets_teacher_fusion_on_positives_zero_on_negatives():
    teacher = torch.cat([m([[1, 1], [0, 0]]), m([[1, 1], [1, 1]])])  # teacher fires on the negative too
    student_map = torch.cat([m([[1, 1], [0, 0]]), m([[0, 0], [0, 0]])])
    out = MILOutput(sides=[student_map], fused=student_map)
    # positive: student equals teacher -> 0; negative: pulled to zero mask, student is empty -> 0
    assert fusion_kd_loss(out, teacher, torch.tensor([1, 0])).item() == pytest.approx(0.0)
    wrong = MILOutput(sides=[teacher], fused=teacher)
    # negative now predicts everything: 0.8 per map, averaged over the batch of 2, two maps
    assert fusion_kd_loss(wrong, teacher, torch.tensor([1, 0])).item() == pytest.approx(2 * (0.0 + 0.8) / 2)


def test_weighted_ce_by_hand():
    t = torch.tensor([[1.0, 0.0]]).view(1, 1, 1, 2)
    p = torch.tensor([[0.9, 0.5]]).view(1, 1, 1, 2)
    ce = torch.tensor([-math.log(0.9), -math.log(0.5)])
    w = torch.softmax(-ce, 0)  # = [0.9, 0.5] / 1.4: easy pixels count more
    assert w[0].item() == pytest.approx(0.9 / 1.4)
    expected = (w * ce).sum().item()
    assert weighted_ce(p, t).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.315284, abs=1e-5)


def test_weighted_ce_uses_log_of_probabilities_with_soft_targets():
    # a soft teacher value 0.3 must act as a soft target (not truncated to 0 by .long())
    t = torch.full((1, 1, 1, 1), 0.3)
    p = torch.full((1, 1, 1, 1), 0.3)
    expected = -(0.3 * math.log(0.3) + 0.7 * math.log(0.7))
    assert weighted_ce(p, t).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_ce_weights_carry_no_gradient():
    t = torch.tensor([[1.0, 0.0, 0.2]]).view(1, 1, 1, 3)
    p = torch.tensor([[0.7, 0.4, 0.6]]).view(1, 1, 1, 3).requires_grad_(True)
    weighted_ce(p, t).backward()
    q = p.detach().clone().requires_grad_(True)
    ce = -(t * torch.log(q) + (1 - t) * torch.log1p(-q))
    w = torch.softmax(-ce.detach().flatten(), 0).view_as(ce)
    (w * ce).sum().backward()
    assert torch.allclose(p.grad, q.grad)


def test_student_loss_scale():
    teacher = m([[0.8, 0.2], [0.6, 0.1]])
    s = m([[0.7, 0.3], [0.5, 0.2]])
    out = MILOutput(sides=[s, s], fused=s)
    labels = torch.tensor([1])
    total, parts = student_loss(out, teacher, labels, wce_scale=0.25)
    assert total.item() == pytest.approx(parts["kd"].item() + 0.25 * parts["wce"].item(), rel=1e-6)
    assert parts["kd"].item() == pytest.approx(fusion_kd_loss(out, teacher, labels).item())


# ---------------------------------------------------------------- KD structures (paper Fig. 2)


def _kd_case():
    t = MILOutput(sides=[m([[1, 0], [0, 0]]), m([[1, 1], [1, 1]])], fused=m([[1, 1], [0, 0]]))
    s = MILOutput(sides=[m([[1, 0], [0, 0]]), m([[1, 1], [1, 1]])], fused=m([[1, 1], [0, 0]]))
    return s, t


def test_kd_structures_by_hand_on_a_positive():
    s, t = _kd_case()
    pos = torch.tensor([1])
    # output (Fig. 2a): Dice(f, tf): inter 2, sums 2 + 2 -> 1 - 5/5 = 0
    assert kd_loss(s, t, pos, "output").item() == pytest.approx(0.0)
    # fusion (IKD): every student map to tf: side 1 1 - 3/4, side 2 1 - 5/7, fused 0
    assert kd_loss(s, t, pos, "fusion").item() == pytest.approx(0.25 + 2 / 7)
    assert kd_loss(s, t, pos, "fusion").item() == pytest.approx(fusion_kd_loss(s, t.fused, pos).item())
    # block (Fig. 2b): side i to teacher side i (both equal) and fused to fused -> 0
    assert kd_loss(s, t, pos, "block").item() == pytest.approx(0.0)


def test_kd_structures_pull_negatives_to_the_zero_mask():
    s, t = _kd_case()
    neg = torch.tensor([0])
    # flipped: fused p' = [[0,0],[1,1]] vs all ones: 1 - 5/7; side 1 p' sum 3: 1 - 7/8; side 2 p' = 0: 1 - 1/5
    assert kd_loss(s, t, neg, "output").item() == pytest.approx(2 / 7)
    assert kd_loss(s, t, neg, "block").item() == pytest.approx(1 / 8 + 0.8 + 2 / 7)
    assert kd_loss(s, t, neg, "fusion").item() == pytest.approx(1 / 8 + 0.8 + 2 / 7)  # teacher ignored


def test_student_loss_takes_the_structure_and_keeps_the_wce_on_fused_maps():
    s, t = _kd_case()
    pos = torch.tensor([1])
    for structure in KD_STRUCTURES:
        total, parts = student_loss(s, t, pos, wce_scale=0.5, structure=structure)
        assert parts["kd"].item() == pytest.approx(kd_loss(s, t, pos, structure).item())
        assert parts["wce"].item() == pytest.approx(weighted_ce(s.fused, t.fused).item())
        assert total.item() == pytest.approx((parts["kd"] + 0.5 * parts["wce"]).item(), rel=1e-6)
    assert student_loss(s, t, pos, wce_scale=0.0)[0].item() == pytest.approx(kd_loss(s, t, pos).item())  # no-wce
    with pytest.raises(ValueError, match="side maps"):
        kd_loss(s, MILOutput(sides=[], fused=t.fused), pos, "block")
