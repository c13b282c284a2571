"""A tiny registered backbone for the training tests of tests/methods (VGG16 at 32 px costs about 0.4 s a
step on the loaded 2-core CI machine; this one a few ms). Every method is also trained on vgg16 by the
registry-parametrised tests/engine/test_methods.py."""

from __future__ import annotations

import pytest
from fakes.models import TinyNet

from ikdmil.models import registry


@pytest.fixture
def tiny_backbone(monkeypatch) -> str:
    """Registers backbone "tiny" for the test only; returns its name."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_backbone("tiny")(lambda pretrained=None: (TinyNet(), "random init (tiny test backbone)"))
    return "tiny"
