"""`ikdmil prepare digestpath` on a fake DigestPath tree (JPEG images, JPEG *_mask images)."""

import json

import numpy as np
import pytest
from fakes.slides import make_fake_digestpath
from PIL import Image

from ikdmil.cli import main
from ikdmil.data.manifest import load_samples
from ikdmil.prepare.digestpath import crop_positions

ARGS = ["--patch-size", "64", "--tissue-min-object-um2", "100", "--quiet"]


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_digestpath(tmp_path_factory.mktemp("dp") / "src")


def test_crops_are_labelled_by_their_mask_and_split_by_image(fake, tmp_path):
    out = tmp_path / "data"
    assert main(["prepare", "digestpath", str(fake["images"]), str(fake["masks"]), str(out), *ARGS]) == 0
    summary = json.loads((out / "digestpath_summary.json").read_text())
    assert summary["images_with_tumour"] == ["pos-00", "pos-01", "pos-02", "pos-03"]
    images = summary["images"]
    assert sorted(images["train"] + images["val"] + images["test"]) == sorted(fake["truth"])
    for split in ("train", "test"):
        assert any(n.startswith("pos") for n in images[split]) and any(n.startswith("neg") for n in images[split])
    samples = load_samples(out)
    assert {s.mpp for s in samples} == {0.5}  # --mpp's default, recorded for training
    assert (summary["counts"]["train"]["total"] + summary["counts"]["val"]["total"]
            + summary["counts"]["test"]["total"] == len(samples))
    n_pos = 0
    for s in samples:
        name, xy = s.image.stem.split("_x")
        x, y = int(xy.split("_y")[0]), int(xy.split("_y")[1])
        assert name in images[s.split]  # all crops of an image stay in its split
        truth = fake["truth"][name][y:y + 64, x:x + 64]
        assert s.label == int(truth.any())
        assert Image.open(s.image).size == (64, 64)
        if s.label:
            n_pos += 1
            mask = np.asarray(Image.open(s.mask)) > 0
            assert (mask[:truth.shape[0], :truth.shape[1]] == truth).mean() > 0.97  # JPEG mask, thresholded
        else:
            assert s.mask is None
    assert n_pos > 0 and n_pos < len(samples)
    assert sum(summary["tumour_fraction_histogram"]["train"]) == summary["counts"]["train"]["pos"]


def test_crop_positions_cover_the_image_evenly():
    assert crop_positions(100, 1536) == [0]
    assert crop_positions(3072, 1536) == [0, 1536]
    pos = crop_positions(4000, 1536)
    assert pos[0] == 0 and pos[-1] == 4000 - 1536 and len(pos) == 3


def test_a_mask_of_another_size_is_an_error(fake, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "pos-00_mask.jpg")
    code = main(["prepare", "digestpath", str(fake["images"]), str(masks), str(tmp_path / "o"), *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "pos-00_mask.jpg" in err and "pair each image" in err
