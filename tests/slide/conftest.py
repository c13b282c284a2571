"""Fixtures of the slide tests."""

import numpy as np
import pytest
from fakes.slides import synth_slide, write_slide


@pytest.fixture(scope="module")
def fake_slide(tmp_path_factory):
    rng = np.random.default_rng(0)
    img, mask = synth_slide(rng, 4, 6, 64, tumour={(1, 2)}, glass={(0, 0), (0, 1)})
    path = write_slide(tmp_path_factory.mktemp("slide") / "s.tif", img, mpp=0.25, tile=64, levels=3)
    return path, img, mask
