"""Every registered backbone as a MIL teacher (gradients, stage-1 steps under both teacher losses), the
GeM MIL loss by hand, Swin's shifted windows against a per-token reference, and a user's own backbone
registered from Python and trained through the CLI.

The output contract (shapes, [0, 1]) of every backbone is checked in tests/models/test_models.py.
"""

import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ikdmil.config import RunConfig
from ikdmil.engine.teacher import fusion_optimizer, make_fusion_step, make_teacher_step, teacher_optimizer
from ikdmil.errors import IkdmilError
from ikdmil.losses import TEACHER_LOSSES, gem_bce, gem_mil_loss, gem_pool, mil_loss
from ikdmil.models import MILOutput, available_backbones, create_model, registry
from ikdmil.models.checkpoint import load_model

CPU = torch.device("cpu")


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


# --------------------------------------------------------------------------- GeM MIL loss


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


# --------------------------------------------------------------------------- Swin windows


def test_swin_window_partition_roundtrip_and_relative_index():
    from ikdmil.models.swin import relative_position_index, window_partition, window_reverse

    x = torch.randn(2, 14, 21, 5)
    assert torch.equal(window_reverse(window_partition(x, 7), 7, 14, 21), x)
    idx = relative_position_index(7)
    assert idx.shape == (49, 49) and int(idx.min()) == 0 and int(idx.max()) == 13 * 13 - 1
    assert int(idx[0, 48]) == 0 and int(idx[48, 0]) == 13 * 13 - 1  # offsets (-6,-6) and (+6,+6)


def test_shifted_window_block_matches_a_per_token_reference():
    """Each token attends to the tokens of its window in the cyclically shifted map that were also
    neighbours before the shift (same region), with the bias of their relative position."""
    from ikdmil.models.swin import SwinBlock, shifted_window_mask

    torch.manual_seed(0)
    ws, shift, size, dim, heads = 7, 3, 14, 8, 2
    blk = SwinBlock(dim, heads, ws, shift, drop_path=0.0).eval()
    x = torch.randn(1, size, size, dim)
    with torch.no_grad():
        got = blk(x, shifted_window_mask(size, size, ws, shift, x.device))
        q, k, v = blk.attn.qkv(blk.norm1(x))[0].view(size, size, 3, heads, dim // heads).unbind(2)
        table = blk.attn.relative_position_bias_table

        def region(a):  # the three bands of the shifted map along one axis
            return 0 if a < size - ws else (1 if a < size - shift else 2)

        att = torch.zeros(size, size, dim)
        for i in range(size):
            for j in range(size):
                a, b = (i - shift) % size, (j - shift) % size  # position in the shifted map
                partners = [(i2, j2) for i2 in range(size) for j2 in range(size)
                            if ((i2 - shift) % size) // ws == a // ws and ((j2 - shift) % size) // ws == b // ws
                            and region((i2 - shift) % size) == region(a) and region((j2 - shift) % size) == region(b)]
                for h in range(heads):
                    logits = []
                    for i2, j2 in partners:
                        da = (a % ws) - ((i2 - shift) % size % ws) + ws - 1
                        db = (b % ws) - ((j2 - shift) % size % ws) + ws - 1
                        dot = q[i, j, h] @ k[i2, j2, h] * (dim // heads) ** -0.5
                        logits.append(dot + table[da * (2 * ws - 1) + db, h])
                    w = torch.softmax(torch.stack(logits), 0)
                    att[i, j, h * (dim // heads):(h + 1) * (dim // heads)] = sum(
                        wi * v[i2, j2, h] for wi, (i2, j2) in zip(w, partners))
        z = x + blk.attn.proj(att)[None]
        expect = z + blk.mlp(blk.norm2(z))
    assert torch.allclose(got, expect, atol=1e-5)


# --------------------------------------------------------------------------- your own backbone


class TinyNet(nn.Module):
    """Two conv stages; side outputs at strides 1 and 2 (any number of sides, any strides)."""

    out_channels = [8, 16]

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):  # x: ImageNet-normalised (B, 3, H, W)
        f1 = self.stage1(x)
        return [f1, self.stage2(f1)]


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
