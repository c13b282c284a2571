"""SA-MIL's criss-cross attention against a per-pixel reference; chunking, memory bound, zero gamma."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ikdmil.models import create_model
from ikdmil.models import sa_mil as S


def naive_criss_cross(q, k, v):
    """For every pixel: its column (H positions, itself included) and the rest of its row (W-1), one
    softmax over those H+W-1 energies, the weighted sum of their values."""
    b, _, h, w = q.shape
    out = torch.zeros_like(v)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                pos = [(r, j) for r in range(h)] + [(i, c) for c in range(w) if c != j]
                keys = torch.stack([k[n, :, r, c] for r, c in pos])  # (H+W-1, C')
                vals = torch.stack([v[n, :, r, c] for r, c in pos])  # (H+W-1, C)
                att = torch.softmax(keys @ q[n, :, i, j], dim=0)
                out[n, :, i, j] = att @ vals
    return out


def _qkv(b=2, c=16, h=5, w=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, ch, h, w, generator=g, dtype=dtype) for ch in (c // 8 * 2, c // 8 * 2, c)]


@pytest.mark.parametrize("rows", [None, 1, 2, 5])
def test_criss_cross_equals_the_naive_per_pixel_computation(rows):
    q, k, v = _qkv()
    assert torch.allclose(S.criss_cross(q, k, v, rows_per_chunk=rows), naive_criss_cross(q, k, v), atol=1e-10)


def test_chunked_and_checkpointed_gradients_equal_the_one_chunk_gradients():
    grads = []
    for rows in (5, 2):  # 5 rows: one chunk; 2 rows: three chunks
        q, k, v = (t.requires_grad_() for t in _qkv(seed=1))
        weights = torch.arange(v.numel(), dtype=v.dtype).view_as(v)
        (S.criss_cross(q, k, v, rows_per_chunk=rows) * weights).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-9)


def test_module_applies_the_shared_attention_twice_with_gamma_and_residual():
    torch.manual_seed(0)
    cca = S.CrissCrossAttention(16).double()
    with torch.no_grad():
        cca.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    expect = x
    for _ in range(2):
        att = naive_criss_cross(cca.query_conv(expect), cca.key_conv(expect), cca.value_conv(expect))
        expect = 0.7 * att + expect
    assert cca.query_conv.out_channels == cca.key_conv.out_channels == 2  # C/8
    assert torch.allclose(cca(x), expect, atol=1e-10)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces (forward and backward)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_energies_stay_within_one_chunk_in_forward_and_backward(monkeypatch):
    b, c, h, w = 2, 16, 32, 32
    monkeypatch.setattr(S, "CHUNK_ELEMENTS", 2**14)  # 4 rows of B x W x (H+W) energies per chunk
    q, k, v = (t.float().requires_grad_() for t in _qkv(b, c, h, w))
    with _LargestTensor() as mode:
        S.criss_cross(q, k, v).square().sum().backward()
    full_energies = b * h * w * (h + w)  # what an unchunked criss-cross would hold
    assert mode.largest <= max(2**14, v.numel()) < full_energies < b * (h * w) ** 2


def test_sa_mil_with_zero_gamma_is_vgg_mil():
    """gamma starts at 0, so SA-MIL starts as VGG-MIL with the same conv weights."""
    torch.manual_seed(0)
    sa, _ = create_model("sa_mil", pretrained="none")
    vgg, _ = create_model("vgg16", pretrained="none")
    missing = vgg.load_state_dict(sa.state_dict(), strict=False).missing_keys
    assert missing == []
    sa.eval(), vgg.eval()
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(sa(x).fused, vgg(x).fused, atol=1e-6)
