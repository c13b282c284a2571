"""Large tiles for tile-invariant (fully convolutional) backbones, parametrised over the registry.

For every backbone registered with ``tile_invariant=True`` (random init, side logits scaled so the
maps vary), on a fake slide sized to a 2 x 2 (VGG) or 2 x 1 (ResNets) grid of large tiles:
- the large-tile map equals one forward pass over the whole slide (smoothed and averaged down the
  same way) to within 2/255 everywhere: the overlap covers the receptive field and the Gaussian;
- it equals the small-tile map (the model's input size, here 128 px, a quarter overlap: the path
  used before) within a stated tolerance inside tissue. The small-tile map is the approximate one:
  close for VGG, whose reach (23 px) is below a quarter of the small tile, but off by ~0.1 on
  average for the ResNets, whose receptive fields (reach 120-296 px) are wider than the small tiles;
  that error is what large tiles remove;
- tissue-free regions stay masked out.
"""

import math

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from fakes.slides import random_model, synth_slide, write_slide
from PIL import Image

from ikdmil.inference import PredictSettings, gaussian_smooth, predict, tiling
from ikdmil.inference.model import gaussian_radius, receptive_reach
from ikdmil.models import available_backbones, create_model
from ikdmil.models.checkpoint import load_model
from ikdmil.models.registry import is_tile_invariant

FCN = [name for name in available_backbones() if is_tile_invariant(name)]
SIGMA, OUT_STRIDE = 3.0, 4
#: inside tissue, |large - small| (probability): upper bounds of the mean and the 99th percentile, for
#: backbones whose reach is below a quarter of the small tile (measured: VGG16 0.0015 and 0.05) and for
#: wider ones (ResNets: means 0.09-0.13 and 99th percentiles up to 0.54 with these random-init models,
#: side logits x20: the small-tile map is wrong there, so only its mean is bounded)
SMALL_TILE_TOLERANCE = {"narrow": (0.01, 0.1), "wide": (0.2, None)}


def test_the_registry_declares_which_backbones_are_tile_invariant(tmp_path):
    from ikdmil.inference import load_for_inference

    assert {"vgg16", "resnet18", "resnet34", "resnet50"} <= set(FCN)
    assert not is_tile_invariant("sa_mil") and not is_tile_invariant("swin_t")
    attention = load_for_inference(random_model(tmp_path / "sa.safetensors", "sa_mil"), PredictSettings(device="cpu"))
    assert attention.reach is None  # criss-cross attention sees the whole tile: small tiles, as before
    vgg = load_for_inference(random_model(tmp_path / "v.safetensors", "vgg16"), PredictSettings(device="cpu"))
    assert (vgg.reach, vgg.net_stride) == (23, 4)
    forced = load_for_inference(tmp_path / "v.safetensors", PredictSettings(device="cpu", tile_size=256))
    assert forced.reach is None  # --tile-size (or --overlap) given: the user's tiling, no large tiles


def test_receptive_reach_matches_the_receptive_field_arithmetic():
    # VGG16 blocks 1-3: RF 40 px (half 20) + bilinear support of the stride-4 map; ResNet-18 stages 1-3: RF 211
    assert receptive_reach(create_model("vgg16", pretrained="none")[0].backbone) == (23, 4)
    assert receptive_reach(create_model("resnet18", pretrained="none")[0].backbone) == (120, 16)


def _reference(model_file, img: np.ndarray) -> np.ndarray:
    """One forward pass over the whole image, smoothed and averaged down as predict does, as uint8."""
    model, _ = load_model(model_file)
    with torch.no_grad():
        fused = model.eval()(torch.from_numpy(img).permute(2, 0, 1)[None]).fused[:, 0]
    p = F.avg_pool2d(gaussian_smooth(fused, SIGMA)[:, None], OUT_STRIDE)[0, 0].numpy()
    return np.rint(p * 255).astype(np.uint8)


@pytest.mark.parametrize("name", FCN)
def test_large_tiles_equal_a_whole_slide_pass_and_small_tiles_within_tolerance(name, tmp_path, monkeypatch):
    reach, stride = receptive_reach(create_model(name, pretrained="none")[0].backbone)
    align = math.lcm(stride, OUT_STRIDE)
    _, overlap, margin = tiling.large_tilings(reach, stride, gaussian_radius(SIGMA), OUT_STRIDE, (1e9, 1e9))[0]
    step = -(-64 // align) * align  # large tiles just above the overlap: fast
    tile = overlap + step
    monkeypatch.setattr(tiling, "LARGE_TILES", (tile,))
    # a grid that ends on the slide's edge: 2 x 2 tiles, or 2 x 1 for the ResNets, whose tiles are costly
    # (rows are stitched by the same code as columns, and VGG covers the 2 x 2 corners)
    rows = 2 if reach < 64 else 1
    width, height = tile + step, tile + (rows - 1) * step
    cells = -(-width // 64)
    img, _ = synth_slide(np.random.default_rng(3), cells, cells, 64, tumour={(0, 1), (cells - 1, 0), (1, 2)},
                         glass={(0, 0), (1, cells - 1)})
    img = np.ascontiguousarray(img[:height, :width])
    slide = write_slide(tmp_path / "s.tif", img, mpp=0.5, tile=64, levels=1)  # model resolution: no resampling
    model_file = random_model(tmp_path / f"{name}.safetensors", name, input_size=128, gain=20)

    base = dict(sigma=SIGMA, out_stride=OUT_STRIDE, workers=0, device="cpu", large_tiles=True)
    large = predict(model_file, [slide], tmp_path / "large", PredictSettings(**base), progress=False)
    small = predict(model_file, [slide], tmp_path / "small", PredictSettings(tile_size=128, **base), progress=False)
    assert not large.failures and not small.failures
    s = large.slides[0]
    assert (s["tile_size"], s["overlap"], s["blend_margin"], s["tiles_total"]) == (tile, overlap, margin, 2 * rows)
    assert (small.slides[0]["tile_size"], small.slides[0]["overlap"], small.slides[0]["blend_margin"]) == (128, 32, 0)

    def read(run: str, name: str) -> np.ndarray:
        return tifffile.imread(tmp_path / run / "s" / name, key=0)

    p_large, p_small = read("large", "probability.tif"), read("small", "probability.tif")
    ref = _reference(model_file, img)
    assert ref.std() > 5  # the map depends on the image
    assert np.abs(p_large.astype(int) - ref).max() <= 2  # uint8 rounding + the window's eps

    overview_tissue = Image.open(tmp_path / "large" / "s" / "tissue.png").convert("L")
    tissue = np.asarray(overview_tissue.resize(p_large.shape[::-1], Image.Resampling.NEAREST)) > 0
    assert tissue.shape == ref.shape == (-(-height // OUT_STRIDE), -(-width // OUT_STRIDE))
    assert 0.5 < tissue.mean() and not tissue.all()
    diff = np.abs(p_large.astype(float) - p_small)[tissue] / 255
    mean_tol, p99_tol = SMALL_TILE_TOLERANCE["narrow" if reach < 128 // 4 else "wide"]
    assert diff.mean() < mean_tol, (name, diff.mean())
    assert p99_tol is None or np.percentile(diff, 99) < p99_tol, (name, np.percentile(diff, 99))
    assert not read("large", "mask.tif")[~tissue].any()  # tissue-free regions stay masked out
