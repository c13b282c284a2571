"""Slide reading: OpenSlide and plain images, levels, resolution, scaled reads, one-line errors."""

import numpy as np
import pytest
from PIL import Image

from ikdmil.errors import IkdmilError
from ikdmil.slide.reader import ImageSlide, open_slide, read_overview, read_scaled


def test_openslide_reads_the_fake_slide_with_levels_and_mpp(fake_slide):
    path, img, _ = fake_slide
    with open_slide(path) as s:
        assert s.kind == "openslide:generic-tiff"
        assert s.dimensions == (384, 256)
        assert s.level_count == 3 and s.level_downsamples == (1.0, 2.0, 4.0)
        assert s.mpp == pytest.approx((0.25, 0.25)) and s.mpp_source == "metadata"
        assert (s.read_region((10, 20), 0, (50, 30)) == img[20:50, 10:60]).all()
        # the same file with --mpp: the override wins
    with open_slide(path, mpp=0.3) as s:
        assert s.mpp == (0.3, 0.3) and s.mpp_source == "--mpp"


def test_read_scaled_copies_exactly_at_scale_one_and_downsamples_from_the_finer_level(fake_slide):
    path, img, _ = fake_slide
    with open_slide(path) as s:
        assert (read_scaled(s, (64, 32, 100, 80), (100, 80)) == img[32:112, 64:164]).all()
        assert s.best_level(2.0) == 1 and s.best_level(3.0) == 1 and s.best_level(1.5) == 0
        half = read_scaled(s, (0, 0, 384, 256), (192, 128)).astype(float)  # level 1, exact
        three = read_scaled(s, (0, 0, 384, 256), (128, 85)).astype(float)  # level 1 -> resampled
        assert half.shape == (128, 192, 3) and three.shape == (85, 128, 3)
        ref = img.reshape(128, 2, 192, 2, 3).mean(axis=(1, 3))
        assert np.abs(half - ref).mean() < 3
        assert abs(three.mean() - img.mean()) < 3
        # beyond the slide: white glass
        assert (s.read_region((380, 250), 0, (20, 20))[10:, 10:] == 255).all()
        assert read_overview(s, 4.0).shape == (64, 96, 3)


def test_plain_images_read_mpp_from_dpi_and_fail_clearly_without(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "with.png", dpi=(25400 / 0.5, 25400 / 0.5))
    Image.fromarray(img).save(tmp_path / "screen.png", dpi=(72, 72))
    Image.fromarray(img).save(tmp_path / "plain.jpg")
    s = open_slide(tmp_path / "with.png")
    assert isinstance(s, ImageSlide) and s.mpp == pytest.approx((0.5, 0.5), rel=1e-3)
    assert (s.read_region((0, 0), 0, (50, 40)) == img).all()
    for name in ("screen.png", "plain.jpg"):  # 72 dpi is a screen default, not a scan: treated as missing
        s = open_slide(tmp_path / name)
        assert s.mpp is None
        with pytest.raises(IkdmilError, match=r"no resolution .* pass --mpp"):
            s.require_mpp()
    assert open_slide(tmp_path / "plain.jpg", mpp=0.25).mpp == (0.25, 0.25)


def test_unreadable_files_give_one_line_errors(tmp_path):
    (tmp_path / "junk.svs").write_bytes(b"not a slide" * 50)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 30)
    for name in ("junk.svs", "junk.png", "missing.tif"):
        with pytest.raises(IkdmilError) as exc:
            open_slide(tmp_path / name)
        assert name in str(exc.value) and "\n" not in str(exc.value)
