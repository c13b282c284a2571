"""Stain statistics: measured on training images, stored in the model file by training, read back by predict."""

import numpy as np
import pytest
from fakes.models import TinyNet
from PIL import Image

from ikdmil.cli import main
from ikdmil.errors import IkdmilError
from ikdmil.models import registry
from ikdmil.models.checkpoint import read_model_meta
from ikdmil.prepare.synth import synth_image
from ikdmil.stain import from_meta, scale_stains, slide_stats, stain_distance, tissue_hed, training_stats


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return np.stack([synth_image(rng, 64, float(i % 2))[0] for i in range(16)])


def test_statistics_are_those_of_the_tissue_pixels_and_glass_is_left_out(images):
    stats = training_stats(images)
    pixels = np.concatenate([tissue_hed(im[::2, ::2]) for im in images])
    assert stats.images == 16 and stats.pixels == len(pixels)
    assert stats.mean == pytest.approx(pixels.mean(0)) and stats.std == pytest.approx(pixels.std(0))
    glass = images.copy()
    glass[:, :, :32] = 240  # half of every image is glass: the statistics of the tissue do not move much
    assert training_stats(glass).mean == pytest.approx(stats.mean, rel=0.3)
    assert training_stats(np.full((5, 32, 32, 3), 240, np.uint8)) is None  # no tissue: no statistics


def test_the_distance_is_zero_for_the_training_data_and_grows_with_a_stain_shift(images):
    ref = training_stats(images)
    assert max(stain_distance(ref, ref)) == 0
    z = [stain_distance(slide_stats(scale_stains(images[0], h), None), ref)[0] for h in (1.0, 2.0, 3.0)]
    assert z[0] < z[1] < z[2]


def test_model_metadata_round_trips_and_damaged_entries_are_one_line_errors(images, tmp_path):
    stats = training_stats(images)
    back = from_meta({"stain": stats.to_meta()}, "m.safetensors")
    assert back.mean == pytest.approx(stats.mean, abs=1e-6) and back.images == stats.images
    assert from_meta({}, "m.safetensors") is None
    bad = dict(stats.to_meta(), spread=[0.1, float("nan"), 0.1])
    with pytest.raises(IkdmilError, match="m.safetensors: damaged stain statistics"):
        from_meta({"stain": bad}, "m.safetensors")


def test_training_stores_the_training_images_stain_in_the_model_file(tiny_synth, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_backbone("tiny")(lambda pretrained=None: (TinyNet(), "random init"))
    out = tmp_path / "run"
    assert main(["train", str(tiny_synth), "--out", str(out), "--backbone", "tiny", "--input-size", "32",
                 "--batch-size", "4", "--teacher-epochs", "1", "--fusion-epochs", "1", "--eval-sigma", "0",
                 "--pretrained", "none", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--quiet"]) == 0
    stain = read_model_meta(out / "teacher.safetensors")["stain"]
    train = sorted((tiny_synth / "train").rglob("*.png"))
    train = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in train if "masks" not in p.parts])
    expected = training_stats(train)  # the synthetic images are already 32 px: the cache holds them as they are
    assert stain["space"] == "skimage-rgb2hed" and stain["images"] == len(train)
    assert stain["mean"] == pytest.approx(expected.mean, abs=1e-5)
