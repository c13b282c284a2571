"""Side heads and the softmax-weighted fusion."""

import pytest
import torch

from ikdmil.models import create_model


def test_fusion_is_softmax_weighted_sum_of_sides():
    model, _ = create_model("vgg16", pretrained="none")
    model.eval()
    with torch.no_grad():
        model.fusion_logits.copy_(torch.tensor([2.0, 0.0, -1.0]))
        out = model(torch.rand(1, 3, 32, 32))
    w = torch.softmax(torch.tensor([2.0, 0.0, -1.0]), 0)
    assert torch.allclose(model.fusion_weights, w)
    assert torch.allclose(out.fused, sum(wi * s for wi, s in zip(w, out.sides)), atol=1e-6)
    assert float(model.fusion_weights.detach().sum()) == pytest.approx(1.0)
