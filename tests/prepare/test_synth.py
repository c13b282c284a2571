"""The procedural H&E generator: API contract, determinism, exact masks, layout, and honesty checks.

The last two tests guard the properties that make the synthetic data a fair stand-in: colour alone
must not give the label away (per-image stain jitter dominates), while the tumour region itself must
carry a real haematoxylin/nuclear signal a model can learn.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from skimage.color import rgb2hed

from ikdmil.data.manifest import SPLITS, load_samples
from ikdmil.errors import IkdmilError
from ikdmil.io import read_mask, read_rgb
from ikdmil.prepare.synth import make_synthetic_dataset, synth_image


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset40(tmp_path_factory) -> Path:
    """40 images of 128 px, seed 0 (shared by the layout, fraction and colour tests)."""
    out = tmp_path_factory.mktemp("synth40")
    make_synthetic_dataset(out, n=40, seed=0, size=128, progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# synth_image


@pytest.mark.parametrize("size", [32, 64, 128, 256, 512])
def test_synth_image_shapes_and_dtypes(size):
    img, mask = synth_image(np.random.default_rng(size), size=size, tumour_fraction=0.3)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == bool
    assert 0.2 < mask.mean() < 0.4
    # it is an image, not a constant: real spread of intensities in every channel
    assert (img.reshape(-1, 3).std(0) > 10).all()


@pytest.mark.parametrize("fraction", [0.04, 0.1, 0.3, 0.55, 0.8])
def test_synth_image_mask_matches_requested_fraction(fraction):
    _, mask = synth_image(np.random.default_rng(7), size=128, tumour_fraction=fraction)
    assert abs(mask.mean() - fraction) < 0.02


def test_synth_image_negative_and_whole_patch():
    rng = np.random.default_rng(3)
    _, neg = synth_image(rng, size=64, tumour_fraction=0.0)
    _, full = synth_image(rng, size=64, tumour_fraction=1.0)
    assert not neg.any()
    assert full.all()


def test_synth_image_is_deterministic_by_rng():
    a_img, a_mask = synth_image(np.random.default_rng([5, 1]), size=96, tumour_fraction=0.4)
    b_img, b_mask = synth_image(np.random.default_rng([5, 1]), size=96, tumour_fraction=0.4)
    c_img, c_mask = synth_image(np.random.default_rng([5, 2]), size=96, tumour_fraction=0.4)
    assert a_img.tobytes() == b_img.tobytes() and a_mask.tobytes() == b_mask.tobytes()
    assert a_img.tobytes() != c_img.tobytes()
    assert a_mask.tobytes() != c_mask.tobytes()


@pytest.mark.parametrize("kwargs", [{"size": 16}, {"tumour_fraction": -0.1}, {"tumour_fraction": 1.5}])
def test_synth_image_rejects_bad_arguments(kwargs):
    with pytest.raises(IkdmilError):
        synth_image(np.random.default_rng(0), **kwargs)


# ---------------------------------------------------------------------------------------------
# make_synthetic_dataset


def test_dataset_layout_manifest_and_masks(dataset40):
    out = dataset40
    assert (out / "manifest.csv").is_file()
    samples = load_samples(out)
    assert len(samples) == 40
    assert {s.mpp for s in samples} == {0.5}  # the stated resolution of the drawing
    assert len({s.image.name for s in samples}) == 40
    for split in SPLITS:
        labels = Counter(s.label for s in samples if s.split == split)
        assert labels[0] >= 1 and labels[1] >= 1, (split, labels)
    for s in samples:
        assert s.image.resolve() == (out / s.split / ("pos" if s.label else "neg") / s.image.name).resolve()
        assert s.mask is not None and s.mask.resolve() == (out / s.split / "masks" / s.image.name).resolve()
        img = read_rgb(s.image)
        mask = read_mask(s.mask, expect_shape=img.shape[:2])  # 0/255 PNG, same size as the image
        assert img.shape == (128, 128, 3)
        assert mask.any() == bool(s.label), s.image
    params = json.loads((out / "synth.json").read_text())
    assert (params["seed"], params["n"], params["size"]) == (0, 40, 128)


def test_dataset_positive_fractions_span_small_foci_to_whole_patches(dataset40):
    fractions = sorted(read_mask(s.mask).mean() for s in load_samples(dataset40) if s.label == 1)
    assert fractions[0] <= 0.1  # small foci
    assert fractions[-1] == 1.0  # whole-patch tumour
    assert any(0.2 <= f <= 0.9 for f in fractions)  # and partial patches in between
    assert len({round(f, 2) for f in fractions}) >= 6


def test_dataset_is_deterministic_by_seed(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n=6, seed=3, size=64, progress=False)
    b = make_synthetic_dataset(tmp_path / "b", n=6, seed=3, size=64, progress=True)
    c = make_synthetic_dataset(tmp_path / "c", n=6, seed=4, size=64, progress=False)
    assert a == tmp_path / "a" / "manifest.csv"
    ta, tb, tc = (_tree_bytes(p.parent) for p in (a, b, c))
    assert ta == tb
    assert ta.keys() == tc.keys()
    differ = [k for k in ta if k.endswith(".png") and "/masks/" not in k and ta[k] != tc[k]]
    assert len(differ) == 6


def test_dataset_image_depends_only_on_seed_and_index(tmp_path):
    """Image i is synth_image(default_rng([seed, i]), ...): regenerate the negatives one by one."""
    samples = load_samples(make_synthetic_dataset(tmp_path, n=8, seed=9, size=64, progress=False))
    negatives = [s for s in samples if s.label == 0]
    assert negatives
    for s in negatives:
        i = int(s.image.stem.rsplit("_", 1)[1])
        img, mask = synth_image(np.random.default_rng([9, i]), size=64, tumour_fraction=0.0)
        assert np.array_equal(read_rgb(s.image), img), s.image
        assert not read_mask(s.mask).any()


@pytest.mark.parametrize("n", [6, 7, 9, 13])
def test_tiny_datasets_still_have_both_classes_in_every_split(tmp_path, n):
    samples = load_samples(make_synthetic_dataset(tmp_path, n=n, seed=1, size=32, progress=False))
    assert len(samples) == n
    for split in SPLITS:
        labels = {s.label for s in samples if s.split == split}
        assert labels == {0, 1}, (n, split)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 5},
        {"val_fraction": 0.0},
        {"test_fraction": 1.0},
        {"val_fraction": 0.5, "test_fraction": 0.5},
        {"pos_fraction": 0.0},
        {"pos_fraction": 1.0},
        {"size": 8},
        {"n": 6, "val_fraction": 0.45, "test_fraction": 0.45},  # leaves no room to train
    ],
)
def test_dataset_rejects_bad_arguments_before_writing(tmp_path, kwargs):
    out = tmp_path / "out"
    with pytest.raises(IkdmilError):
        make_synthetic_dataset(out, progress=False, **{"n": 12, **kwargs})
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# honesty checks


def test_colour_alone_does_not_separate_tumour(dataset40):
    """Between-image stain jitter is larger than the colour shift that tumour causes.

    Over the 40 images, the difference between the mean RGB of positives and of negatives must be
    smaller than the between-image std of mean RGB in every channel (in the generator's design the
    ratio is about 0.6 for red and 0.35 for green and blue).
    """
    samples = load_samples(dataset40)
    means = np.array([read_rgb(s.image).reshape(-1, 3).mean(0) for s in samples])
    labels = np.array([s.label for s in samples])
    diff = np.abs(means[labels == 1].mean(0) - means[labels == 0].mean(0))
    spread = means.std(0, ddof=1)
    assert (spread > 10).all(), spread  # the jitter is real, not a few grey levels
    assert (diff < spread).all(), (diff, spread)
    # and within the negatives alone (no tumour at all) the colour already varies this much
    assert (means[labels == 0].std(0, ddof=1) > 0.5 * diff).all()


def test_tumour_region_is_more_haematoxylin_dense_than_normal_tissue():
    """Inside each image, the tumour region has more haematoxylin (crowded, large nuclei) than the rest."""
    h_ratio, darker = [], []
    for i, fraction in enumerate([0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.85] * 2):
        img, mask = synth_image(np.random.default_rng([21, i]), size=256, tumour_fraction=fraction)
        h = rgb2hed(img)[..., 0]  # standard colour deconvolution, blind to the per-image jitter
        h_ratio.append(h[mask].mean() / h[~mask].mean())
        grey = img.mean(2)
        darker.append(grey[mask].mean() < grey[~mask].mean())
    h_ratio = np.array(h_ratio)
    # Tissue varies (a dense lymphoid aggregate is dark but benign), so one exception is allowed, but
    # the signal has to be there in nearly every image and clearly on average.
    assert (h_ratio > 1.0).mean() >= 0.9, h_ratio
    assert np.mean(darker) >= 0.9, darker
    assert np.median(h_ratio) > 1.25, h_ratio


def test_dataset_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(IkdmilError, match="cannot write"):
        make_synthetic_dataset(blocker / "out", n=6, size=32, progress=False)


def test_synth_never_writes_into_another_dataset(tmp_path):
    from ikdmil.errors import IkdmilError
    from ikdmil.prepare.synth import make_synthetic_dataset

    out = tmp_path / "data"
    make_synthetic_dataset(out, n=12, seed=1, size=32, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # the same parameters again: allowed, and nothing changes
    make_synthetic_dataset(out, n=12, seed=1, size=32, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # other parameters, or a folder of someone else's files: refused, nothing touched
    with pytest.raises(IkdmilError, match="another synthetic dataset"):
        make_synthetic_dataset(out, n=14, seed=2, size=32, progress=False)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(IkdmilError, match="not a synthetic dataset"):
        make_synthetic_dataset(other, n=12, seed=1, size=32, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
