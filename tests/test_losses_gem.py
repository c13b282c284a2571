"""The GeM MIL teacher loss by hand, its validation, and the fusion fit under it."""

import math

import pytest
import torch

from ikdmil.config import RunConfig
from ikdmil.engine.teacher import fusion_optimizer, make_fusion_step, make_teacher_step
from ikdmil.errors import IkdmilError
from ikdmil.losses import gem_bce, gem_mil_loss, gem_pool
from ikdmil.models import MILOutput, create_model

CPU = torch.device("cpu")


def test_fusion_fit_with_the_gem_loss_moves_only_the_fusion_weights():
    torch.manual_seed(0)
    model, _ = create_model("resnet18", pretrained="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = make_fusion_step(model, fusion_optimizer(model, lr=0.1), CPU, amp=False, loss="gem")
    for _ in range(3):
        step(torch.rand(4, 3, 32, 32), torch.tensor([1, 0, 1, 0]))
    after = model.state_dict()
    assert not torch.equal(after["fusion_logits"], before["fusion_logits"])
    assert all(torch.equal(after[k], before[k]) for k in before if k != "fusion_logits")


def m(values):
    """(1,1,H,W) tensor from a nested list."""
    return torch.tensor(values, dtype=torch.float32)[None, None]


def test_gem_pool_by_hand():
    # one of four pixels at 1: (mean p^4)^(1/4) = (1/4)^(1/4) = 1/sqrt(2)
    assert gem_pool(m([[1, 0], [0, 0]])).item() == pytest.approx(2**-0.5, rel=1e-6)
    # a constant map pools to its value, whatever r
    assert gem_pool(m([[0.3, 0.3], [0.3, 0.3]])).item() == pytest.approx(0.3, rel=1e-6)
    # (0.5^4 + 1^4) / 2 = 0.53125 -> 0.53125^(1/4); r = 1 is the mean
    assert gem_pool(m([[0.5, 1.0]])).item() == pytest.approx(0.53125**0.25, rel=1e-6)
    assert gem_pool(m([[0.5, 1.0]]), r=1).item() == pytest.approx(0.75, rel=1e-6)


def test_gem_bce_by_hand():
    one = m([[1, 0], [0, 0]])
    s = 2**-0.5
    assert gem_bce(one, torch.tensor([1])).item() == pytest.approx(-math.log(s), rel=1e-5)
    assert gem_bce(one, torch.tensor([0])).item() == pytest.approx(-math.log(1 - s), rel=1e-5)
    half = m([[0.5, 0.5], [0.5, 0.5]])
    both = torch.cat([one, half])  # batch mean of the two images' BCE
    expect = (-math.log(s) + math.log(2)) / 2
    assert gem_bce(both, torch.tensor([1, 0])).item() == pytest.approx(expect, rel=1e-5)
    # an all-zero map on a negative costs (almost) nothing, and its gradient is finite
    zero = m([[0.0, 0.0], [0.0, 0.0]]).requires_grad_()
    loss = gem_bce(zero, torch.tensor([0]))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-5) and torch.isfinite(zero.grad).all()


def test_gem_mil_loss_sums_the_fusion_and_every_side():
    p, q = m([[1, 0], [0, 0]]), m([[0.5, 0.5], [0.5, 0.5]])
    out = MILOutput(sides=[p, q], fused=p)
    y = torch.tensor([1])
    assert gem_mil_loss(out, y).item() == pytest.approx(2 * -math.log(2**-0.5) + math.log(2), rel=1e-5)


def test_teacher_loss_is_validated():
    assert RunConfig(teacher_loss="gem").validate().teacher_loss == "gem"
    with pytest.raises(IkdmilError, match="--teacher-loss must be one of dice, gem"):
        RunConfig(teacher_loss="bce").validate()
    with pytest.raises(IkdmilError, match="teacher-loss 'bce'"):
        make_teacher_step(None, None, CPU, amp=False, loss="bce")
