"""A tiny registered backbone for the training tests of tests/methods (VGG16 at 32 px costs about 0.4 s a
step on the loaded 2-core CI machine; this one a few ms). Every method is also trained on vgg16 by the
registry-parametrised tests/engine/test_methods.py."""

from __future__ import annotations

import pytest
from torch import nn

from ikdmil.models import registry


class TinyNet(nn.Module):
    """Two conv stages, side features at strides 1 and 2."""

    out_channels = [8, 16]

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):
        f1 = self.stage1(x)
        return [f1, self.stage2(f1)]


@pytest.fixture
def tiny_backbone(monkeypatch) -> str:
    """Registers backbone "tiny" for the test only; returns its name."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_backbone("tiny")(lambda pretrained=None: (TinyNet(), "random init (tiny test backbone)"))
    return "tiny"
