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
