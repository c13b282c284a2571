"""The model's scale (µm/px from the data's mpp), isotropic rescaling, crops and the cache key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes.slides import png_header
from PIL import Image

from ikdmil.data.dataset import build_cache, cache_key
from ikdmil.data.manifest import Sample
from ikdmil.data.scale import Scale, choose_scale, scale_for_model, spread_starts
from ikdmil.engine.loop import Cropper, crop_batch
from ikdmil.errors import IkdmilError


def _headers(tmp_path, sizes, mpp):
    return [Sample(png_header(tmp_path / f"{i}.png", w, h), 1, None, "train", mpp) for i, (w, h) in enumerate(sizes)]


def test_default_scale_puts_the_median_short_side_at_the_input_size(tmp_path):
    glas = _headers(tmp_path, [(775, 522)] * 3 + [(589, 453), (800, 600)], 0.62)
    scale = choose_scale(glas, 256)
    assert scale.mpp == pytest.approx(0.62 * 522 / 256)  # 1.264 µm/px: GlaS at 256 px
    assert scale.of(glas[0]) * 522 == pytest.approx(256)
    assert scale.of(glas[0]) * 775 == pytest.approx(380, abs=0.5)  # the long side keeps its proportion
    assert choose_scale(glas, 256, model_mpp=2.0).mpp == 2.0  # an explicit model_mpp wins
    other = Sample(glas[0].image, 1, None, "train", 0.31)  # twice as fine: rescaled twice as much
    assert scale.of(other) == pytest.approx(scale.of(glas[0]) / 2)


def test_data_without_mpp_gets_a_pixel_factor_and_an_unknown_resolution(tmp_path):
    plain = _headers(tmp_path, [(96, 64), (64, 64)], None)
    scale = choose_scale(plain, 32)
    assert scale.mpp == 0 and scale.factor == pytest.approx(0.5) and "mpp" not in scale.meta()
    assert scale.meta() == {"scale": 0.5}  # evaluate rescales new data the same way
    assert scale_for_model(scale.meta(), plain, 32) == Scale(0.0, 0.5, "the model file's scale")
    with pytest.raises(IkdmilError, match="mpp column for every image or for none"):
        choose_scale(plain + _headers(tmp_path / "m", [(64, 64)], 0.5), 32)


def test_crop_grid_covers_the_image_and_never_leaves_it():
    assert spread_starts(48, 32, 4) == [0, 4, 8, 12, 16]
    assert spread_starts(20, 32, 4) == [0]
    crop = Cropper(np.array([[32, 48], [20, 40]]), 32, seed=0)
    assert crop.views == 5 * 1
    for _ in range(20):
        view = crop.draw(torch.tensor([0, 1]))
        (y0, x0), (y1, x1) = crop.offsets(torch.tensor([0, 1]), view).tolist()
        assert y0 == 0 and 0 <= x0 <= 16 and y1 == 0 and 0 <= x1 <= 8  # inside each image's own width


def _circle_image(path, size, centre, radius):
    """A white image of `size` (w, h) with a dark disc; the disc is also the mask."""
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 <= radius ** 2
    img = np.full((h, w, 3), 240, np.uint8)
    img[disc] = (90, 40, 120)
    Image.fromarray(img).save(path / "img.png")
    Image.fromarray((disc * 255).astype(np.uint8)).save(path / "mask.png")
    return Sample(path / "img.png", 1, path / "mask.png", "train", 0.5)


def _extent(mask: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_a_circle_in_a_non_square_image_stays_a_circle_in_the_cache_and_the_training_crops(tmp_path):
    sample = _circle_image(tmp_path, (192, 128), centre=(120, 64), radius=40)
    arrays = build_cache([sample], 32, tmp_path / "cache", progress=False)  # short side 128 -> 32 px: x 0.25
    assert arrays.images.shape[1:3] == (32, 48) and arrays.sizes.tolist() == [[32, 48]]
    height, width = _extent(arrays.masks[0])
    assert height == width == 20  # 80 px across at x 0.25; squeezed to 32 x 32 it was 20 high, 13 wide
    crop = Cropper(arrays.sizes, 32, seed=1)
    masks = torch.from_numpy(np.array(arrays.masks))[:, None]
    seen = set()
    for _ in range(12):
        view = crop.draw(torch.tensor([0]))
        window = crop_batch(masks, crop.offsets(torch.tensor([0]), view), 32)[0, 0].numpy()
        seen.add(int(view))
        if window[:, 0].sum() == 0 and window[:, -1].sum() == 0:  # the whole disc in the crop
            assert _extent(window) == (20, 20)
    assert len(seen) > 1  # crops move over the image


def test_the_cache_key_and_the_cached_grid_change_with_the_scale(tmp_path):
    sample = _circle_image(tmp_path, (192, 128), centre=(96, 64), radius=30)
    coarse, fine = Scale(2.0), Scale(1.0)
    assert cache_key([sample], 32, coarse) != cache_key([sample], 32, fine)
    a = build_cache([sample], 32, tmp_path / "cache", progress=False, scale=coarse)
    b = build_cache([sample], 32, tmp_path / "cache", progress=False, scale=fine)
    assert a.sizes.tolist() == [[32, 48]] and b.sizes.tolist() == [[64, 96]]
    assert len(list((tmp_path / "cache").iterdir())) == 2
