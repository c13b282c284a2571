"""The pyramidal TIFF writer: consecutive-IFD levels that OpenSlide reads, with mpp, exact reductions."""

import numpy as np
import openslide
import pytest

from ikdmil.slide.tiff import write_pyramid_tiff


def test_pyramid_tiff_opens_in_openslide_with_levels_and_mpp(tmp_path):
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 256, (600, 1000), dtype=np.uint8)
    shapes = write_pyramid_tiff(tmp_path / "p.tif", arr, (2.0, 2.0), tile=128, min_size=128)
    assert shapes == [(600, 1000), (300, 500), (150, 250), (75, 125)]
    s = openslide.OpenSlide(str(tmp_path / "p.tif"))
    assert s.level_count == 4
    assert s.level_dimensions == ((1000, 600), (500, 300), (250, 150), (125, 75))
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(2.0)
    assert float(s.properties["openslide.mpp-y"]) == pytest.approx(2.0)
    level0 = np.asarray(s.read_region((0, 0), 0, (1000, 600)))[..., 0]
    assert (level0 == arr).all()
    level1 = np.asarray(s.read_region((0, 0), 1, (500, 300)))[..., 0].astype(int)
    ref = arr.reshape(300, 2, 500, 2).astype(int).sum(axis=(1, 3))
    assert np.abs(level1 - (ref + 2) // 4).max() == 0
    assert not list(tmp_path.glob(".*"))  # no scratch files left behind
