"""Every registered backbone meets the model contract (shapes, [0, 1], uint8 input, gradients,
stage-1 steps under both teacher losses), and a user's own backbone registered from Python trains
through the CLI. Parametrised over the registry, so a new backbone is tested without new test code.
"""

import math

import pytest
import torch
from fakes.models import TinyNet
from safetensors import safe_open

from ikdmil.engine.teacher import (
    make_teacher_step,
    teacher_optimizer,
)
from ikdmil.errors import IkdmilError
from ikdmil.losses import TEACHER_LOSSES, mil_loss
from ikdmil.models import available_backbones, create_model, registry
from ikdmil.models.checkpoint import load_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", available_backbones())
@pytest.mark.parametrize("size", [64, 72, 100])  # 72, 100: not multiples of 32 (odd maps, window padding)
def test_output_contract(name, size):
    torch.manual_seed(0)
    model, _ = create_model(name, pretrained="none")
    out = model(torch.rand(2, 3, size, size))
    assert len(out.sides) == len(model.backbone.out_channels) >= 2
    for m in out.all_maps():
        assert m.shape == (2, 1, size, size)
        assert float(m.detach().min()) >= 0.0 and float(m.detach().max()) <= 1.0


@pytest.mark.parametrize("name", available_backbones())
def test_uint8_input_equals_float_input(name):
    model, _ = create_model(name, pretrained="none")
    model.eval()
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        a = model(x).fused
        b = model(x.float() / 255).fused
    assert torch.allclose(a, b)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(IkdmilError, match="unknown backbone 'nope'"):
        create_model("nope")


@pytest.mark.parametrize("name", available_backbones())
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model, _ = create_model(name, pretrained="none")
    model.eval()  # no stochastic depth: every branch is on the graph
    with torch.no_grad():  # move zero-initialised parameters (e.g. SA-MIL's gamma) off zero
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    mil_loss(model(torch.rand(2, 3, 64, 64)), torch.tensor([1, 0])).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"{n} gets no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} gets an all-zero gradient"


@pytest.mark.parametrize("loss", sorted(TEACHER_LOSSES))
@pytest.mark.parametrize("name", available_backbones())
def test_stage1_steps_reduce_the_teacher_loss(name, loss):
    torch.manual_seed(0)
    model, _ = create_model(name, pretrained="none")
    x = torch.rand(4, 3, 48, 48)
    y = torch.tensor([1, 0, 1, 0])
    opt = teacher_optimizer(model, lr=1e-3, weight_decay=0.0)
    step = make_teacher_step(model, opt, CPU, amp=False, loss=loss)
    losses = [step(x, y)["loss"] for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert torch.equal(model.fusion_logits.detach(), torch.zeros(len(model.backbone.out_channels)))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test disappear after it (other tests see the built-in backbones)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_a_user_backbone_registered_from_python_trains_through_the_cli(scratch_registry, tiny_synth, tmp_path):
    from ikdmil.cli import main
    from ikdmil.models import register_backbone

    @register_backbone("tiny")
    def tiny(pretrained=None):
        return TinyNet(), "random init (tiny has no pretrained weights)"

    assert "tiny" in available_backbones()
    out = tmp_path / "run"
    rc = main(["train", str(tiny_synth), "--out", str(out), "--backbone", "tiny", "--teacher-loss", "gem",
               "--input-size", "32", "--batch-size", "4", "--teacher-epochs", "1", "--fusion-epochs", "1",
               "--eval-sigma", "0", "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    model, meta = load_model(out / "teacher.safetensors")
    assert meta["backbone"] == "tiny" and isinstance(model.backbone, TinyNet)
    with safe_open(str(out / "teacher.safetensors"), framework="pt") as fh:
        assert "backbone.stage2.0.weight" in fh.keys()
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny")(tiny)
