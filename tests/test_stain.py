"""Stain statistics: measured on training images, stored in the model file by training, read back by predict."""

import numpy as np
import pytest
import torch
from fakes.models import TinyNet
from PIL import Image

from ikdmil.cli import main
from ikdmil.errors import IkdmilError
from ikdmil.models import registry
from ikdmil.models.checkpoint import read_model_meta
from ikdmil.prepare.synth import synth_image
from ikdmil.stain import (
    from_meta,
    hed_to_rgb,
    macenko,
    macenko_reference,
    measure_macenko,
    measure_reinhard,
    reference_from_meta,
    reinhard,
    reinhard_reference,
    rgb_to_hed,
    scale_stains,
    slide_stats,
    stain_distance,
    tissue_hed,
    training_stats,
)


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
    # the Reinhard reference: data without mpp is at the assumed 0.5 µm/px, reduced towards 8 (32 px: to 16 px)
    assert stain["reinhard"]["downsample"] == pytest.approx(2.0)
    assert stain["reinhard"]["mean"] == pytest.approx(reinhard_reference(train, 0.5).mean, abs=1e-5)
    expected = np.array(macenko_reference(train, 0.5).stains)
    assert np.allclose(stain["macenko"]["stains"], expected, atol=1e-5)


# ----------------------------------------------------------------- torch deconvolution, jitter, Reinhard
def _batch(images) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def test_the_torch_deconvolution_is_skimages(images):
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb_to_hed(_batch(images[:4]))
    expected = np.stack([rgb2hed(im) for im in images[:4]]).transpose(0, 3, 1, 2)
    assert np.abs(hed.clamp(min=0).double().numpy() - expected).max() < 1e-6  # skimage clamps at 0, we do not
    back = hed_to_rgb(hed).numpy().astype(int)
    sk = np.stack([(hed2rgb(h.transpose(1, 2, 0)) * 255).round() for h in hed.double().numpy()]).transpose(0, 3, 1, 2)
    assert np.abs(back - sk).max() <= 1  # float32 vs float64 at a rounding edge
    assert torch.equal(hed_to_rgb(hed), _batch(images[:4]))  # unclamped: the round trip is exact


def test_stain_jitter_at_strength_0_is_the_identity_and_draws_nothing(images):
    from ikdmil.engine.loop import Augmenter

    x = _batch(images[:4])
    aug, plain = Augmenter(0, True, 0.0), Augmenter(0, True)
    assert aug.jitter(x) is x
    assert torch.equal(aug.gen.get_state(), plain.gen.get_state())  # old runs resume and repeat exactly


def test_stain_jitter_is_seeded_resumable_and_scales_each_stain_by_about_sigma(images):
    from ikdmil.engine.loop import Augmenter
    from ikdmil.slide.tissue import saturation

    x = _batch(np.repeat(images[1:2], 48, axis=0))  # one image, 48 draws
    a, b = Augmenter(3, True, 0.1), Augmenter(3, True, 0.1)
    state = a.gen.get_state()
    first = a.jitter(x)
    assert torch.equal(first, b.jitter(x)) and not torch.equal(first, a.jitter(x))
    a.gen.set_state(state)  # what --resume restores
    assert torch.equal(a.jitter(x), first)
    keep = (saturation(images[1]) > 0.1) & (images[1].min(-1) > 20)  # tissue, away from RGB clipping
    before, after = rgb_to_hed(x[:1])[0][:, keep].double(), rgb_to_hed(first).double()[:, :, keep]
    slopes, shifts = [], []
    for c in range(3):  # per image and channel the jitter is affine: fit after = scale * before + shift
        design = torch.stack([before[c], torch.ones_like(before[c])], 1)
        fit = torch.linalg.lstsq(design, after[:, c].T).solution  # (2, 48)
        slopes.append(fit[0])
        shifts.append(fit[1])
    assert 0.07 < float(torch.stack(slopes).std()) < 0.13  # sigma 0.1
    assert 0.0012 < float(torch.stack(shifts).std()) < 0.003  # sigma x SHIFT_UNIT = 0.002


def test_reinhard_maps_a_shifted_stain_onto_the_reference_and_leaves_the_reference_alone(images):
    ref = measure_reinhard(images[1])
    shifted = scale_stains(images[1], haematoxylin=1.6, eosin=0.6)
    source = measure_reinhard(shifted)
    assert abs(source.mean[0] / ref.mean[0] - 1) > 0.3
    out = reinhard(_batch(shifted[None]), source, ref)[0].permute(1, 2, 0).numpy()
    got = measure_reinhard(out)
    for c in (0, 1):  # tolerance: 5 % of the mean, 10 % of the std (uint8 rounding, tissue pixels re-selected)
        assert got.mean[c] == pytest.approx(ref.mean[c], rel=0.05)
        assert got.std[c] == pytest.approx(ref.std[c], rel=0.1)
    same = reinhard(_batch(images[1:2]), ref, ref)[0].permute(1, 2, 0).numpy()
    assert np.abs(same.astype(int) - images[1]).max() <= 1


def test_the_reference_is_measured_at_the_overview_scale_and_old_model_files_give_one_line(images):
    ref = reinhard_reference(images, model_mpp=2.0)  # 8 µm/px would be 4x smaller: 64 px -> 16 px
    assert ref.downsample == pytest.approx(4.0) and ref.mpp == pytest.approx(8.0)
    assert reinhard_reference(images, model_mpp=0.25).downsample == pytest.approx(4.0)  # never below 16 px
    back = reference_from_meta({"stain": {"reinhard": ref.to_meta()}}, "m.safetensors", "reinhard")
    assert back.mean == pytest.approx(ref.mean, abs=1e-6)
    for meta in ({}, {"stain": training_stats(images).to_meta()}):
        with pytest.raises(IkdmilError, match=r"m.safetensors: the model file has no stain reference .* retrain "
                                               r"it, or pass --stain-normalise none"):
            reference_from_meta(meta, "m.safetensors", "reinhard")
    with pytest.raises(IkdmilError, match="m.safetensors: damaged stain reference"):
        reference_from_meta({"stain": {"reinhard": dict(ref.to_meta(), std=[1, -1, 1])}}, "m.safetensors",
                            "reinhard")


# ------------------------------------------------------------------------------------------------ Macenko
H_OD, E_OD = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])  # Ruifrok-Johnston's H and E


def stained(stains, rng, n=96, scale=(1.0, 1.0)) -> np.ndarray:
    """uint8 RGB tissue from two OD stain vectors: nuclei (mostly H), stroma (mostly E) and glass."""
    stains = np.array([v / np.linalg.norm(v) for v in stains])
    h = rng.gamma(2.0, 0.25, (n, n)) * (rng.random((n, n)) < 0.4)
    e = rng.gamma(2.0, 0.2, (n, n)) * (rng.random((n, n)) < 0.8)
    conc = np.stack([h * scale[0], e * scale[1]], -1)
    conc[: n // 6] = 0  # a band of glass
    od = conc @ stains
    return np.clip(256 * np.exp(-od) - 1, 0, 255).round().astype(np.uint8)


def _unit(v):
    return np.asarray(v) / np.linalg.norm(v)


def test_macenko_finds_the_stain_vectors_haematoxylin_first():
    ref = measure_macenko(stained([H_OD, E_OD], np.random.default_rng(0)))
    assert float(_unit(ref.stains[0]) @ _unit(H_OD)) > 0.99 and float(_unit(ref.stains[1]) @ _unit(E_OD)) > 0.99
    assert measure_macenko(np.full((32, 32, 3), 250, np.uint8)) is None  # glass only: nothing to fit


def test_macenko_maps_another_labs_stain_hue_and_strength_onto_the_reference():
    """Another lab: a bluer haematoxylin, a more orange eosin, both 1.5x as strong, on the same tissue. Macenko
    recovers it; Reinhard, whose H and E axes are fixed, corrects it far less."""
    original = stained([H_OD, E_OD], np.random.default_rng(1))
    other = stained([[0.55, 0.72, 0.42], [0.02, 0.90, 0.30]], np.random.default_rng(1), scale=(1.5, 1.5))
    ref, source = measure_macenko(original), measure_macenko(other)
    out = macenko(_batch(other[None]), source, ref)[0].permute(1, 2, 0).numpy()
    before = np.abs(other.astype(int) - original).mean()
    after = np.abs(out.astype(int) - original).mean()
    by_reinhard = reinhard(_batch(other[None]), measure_reinhard(other), measure_reinhard(original))[0]
    reinhard_after = np.abs(by_reinhard.permute(1, 2, 0).numpy().astype(int) - original).mean()
    assert after < 0.3 * before and after < reinhard_after, (before, after, reinhard_after)
    same = macenko(_batch(original[None]), ref, ref)[0].permute(1, 2, 0).numpy()
    assert np.abs(same.astype(int) - original).max() <= 1
    assert (out[: 96 // 6] >= 254).all()  # glass stays glass


def test_the_macenko_reference_round_trips_and_a_damaged_one_is_one_line(images):
    ref = macenko_reference(images, model_mpp=2.0)
    assert ref.downsample == pytest.approx(4.0)
    back = reference_from_meta({"stain": {"macenko": ref.to_meta()}}, "m.safetensors", "macenko")
    assert np.allclose(back.stains, ref.stains, atol=1e-6) and np.allclose(back.max_conc, ref.max_conc, atol=1e-6)
    with pytest.raises(IkdmilError, match="m.safetensors: the model file has no stain reference for macenko"):
        reference_from_meta({"stain": {"reinhard": {}}}, "m.safetensors", "macenko")
    with pytest.raises(IkdmilError, match="m.safetensors: damaged stain reference"):
        reference_from_meta({"stain": {"macenko": dict(ref.to_meta(), max_conc=[1, 0])}}, "m.safetensors", "macenko")
