"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("IKDMIL_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture
def glas_dir() -> Path:
    """The real GlaS data (images/, labels/, index.csv), or skip the test when it is not there."""
    path = SHARED / "data" / "glas"
    if not (path / "index.csv").is_file():
        pytest.skip(f"real GlaS data not found at {path}; set IKDMIL_SHARED")
    return path


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """A 12-image synthetic dataset at 32 px in the folder layout (all splits, both classes)."""
    from ikdmil.prepare.synth import make_synthetic_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    make_synthetic_dataset(out, n=12, seed=3, size=32, progress=False)
    return out


def _tiny_config(data: Path, out: Path, **overrides):
    """A RunConfig small enough for a test: 32 px, random init, two tiny epochs per phase (one per phase
    of the comparison methods)."""
    from ikdmil.config import RunConfig

    base = dict(data=str(data), out=str(out), input_size=32, batch_size=4, pretrained="none",
                teacher_epochs=2, fusion_epochs=1, distill_epochs=2, swap_every=1, lr=1e-3,
                eval_sigma=0.0, cache_dir=str(out.parent / "cache"), cam_epochs=1, seg_epochs=1)
    base.update(overrides)
    return RunConfig(**base)


@pytest.fixture
def tiny_config():
    """A factory `tiny_config(data, out, **overrides)` for RunConfigs small enough for a test."""
    return _tiny_config


@pytest.fixture
def tiny_backbone(monkeypatch) -> str:
    """Registers backbone "tiny" (tests/fakes/models.py) for the test only; returns its name. VGG16 at 32 px
    costs about 0.4 s a step on the loaded 2-core CI machine, this one a few ms; every method is also trained
    on vgg16 by the registry-parametrised tests/engine/test_methods.py."""
    from fakes.models import TinyNet

    from ikdmil.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_backbone("tiny")(lambda pretrained=None: (TinyNet(), "random init (tiny test backbone)"))
    return "tiny"
