"""Patch images in `predict` are rescaled isotropically and tiled, never squeezed to the model's square."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ikdmil.engine.evaluate import image_tiles
from ikdmil.inference.model import LoadedModel
from ikdmil.inference.predict import patch_scale, predict_patches
from ikdmil.inference.settings import PredictSettings


def recording_model(input_size=32, meta=None, mpp=0.5, source="model file"):
    """A LoadedModel whose map is each pixel's darkness, and which keeps every tile it was given."""
    seen = []

    def runner(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return (1 - x.float().mean(1, keepdim=True) / 255).clamp(0, 1)

    lm = LoadedModel(None, dict(meta or {}), Path("stub.safetensors"), torch.device("cpu"), input_size, mpp, source,
                     False, 4, runner=runner)
    return lm, seen


def disc_patch(h=100, w=300, centre=(50, 150), radius=30):
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 240, np.uint8)
    img[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2] = 40
    return img


def extent(mask):
    ys, xs = np.nonzero(mask)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_a_wide_patch_is_tiled_at_one_scale_and_a_disc_stays_round(tmp_path):
    Image.fromarray(disc_patch()).save(tmp_path / "wide.png")
    lm, seen = recording_model(input_size=32)
    results = []
    failures = predict_patches(lm, [tmp_path / "wide.png"], tmp_path, PredictSettings(sigma=0), False, results)
    assert failures == []
    tiles = torch.cat(seen)
    # short side 100 -> 32 model px, so the 300 px side becomes 96: four overlapping square tiles, not one squeeze
    assert tiles.shape == (4, 3, 32, 32)
    canvas = np.zeros((32, 96), bool)
    for (_, y, x), t in zip(image_tiles(np.array([[32, 96]]), 32), tiles):
        canvas[y:y + 32, x:x + 32] |= t.float().mean(0).numpy() < 128
    dh, dw = extent(canvas)
    assert 0.85 < dh / dw < 1.15, (dh, dw)  # what the model saw is round (a squeeze would give 3:1)
    mask = np.asarray(Image.open(tmp_path / "masks" / "wide.png")) > 0
    assert mask.shape == (100, 300)
    mh, mw = extent(mask)
    assert abs(mh - 61) <= 4 and abs(mw - 61) <= 4, (mh, mw)
    assert results[0]["model_px_per_image_px"] == pytest.approx(0.32)
    assert results[0]["scale_source"].startswith("short side")


def test_the_patch_scale_comes_from_mpp_metadata_model_scale_or_the_short_side(tmp_path):
    img = Image.fromarray(disc_patch(64, 96, (32, 48), 10))
    img.save(tmp_path / "plain.png")
    img.save(tmp_path / "scanned.png", dpi=(25400 / 0.25, 25400 / 0.25))  # 0.25 µm/px
    lm, _ = recording_model(input_size=32, meta={"mpp": 2.0}, mpp=2.0)
    assert patch_scale(lm, PredictSettings(mpp=0.5), tmp_path / "scanned.png", (64, 96)) == (0.25, "--mpp")
    factor, source = patch_scale(lm, PredictSettings(), tmp_path / "scanned.png", (64, 96))
    assert factor == pytest.approx(0.125) and "metadata" in source
    assert patch_scale(lm, PredictSettings(), tmp_path / "plain.png", (64, 96))[0] == pytest.approx(0.5)
    scaled, _ = recording_model(input_size=32, meta={"scale": 0.75}, mpp=0.5, source="default (model file has no mpp)")
    factor, source = patch_scale(scaled, PredictSettings(), tmp_path / "scanned.png", (64, 96))
    assert (factor, source) == (0.75, "the model file's scale")
