"""Random crops at the model's scale: exact cached teacher targets per crop, whole-image evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ikdmil.data.dataset import CachedArrays
from ikdmil.engine.distill import TeacherTargets, freeze
from ikdmil.engine.evaluate import image_tiles, predict_fused, score_predictions
from ikdmil.engine.loop import BatchMeta, Cropper, crop_batch, dihedral
from ikdmil.models import MILOutput, create_model


def _canvas(n=3, h=32, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g).numpy()


def test_cached_targets_are_the_live_teacher_on_each_crop_position():
    """The crop is part of the view: the same image under the same op at two crop positions gets two
    different targets, each exactly the live teacher's (a cache keyed by image and op only would
    return the first crop's map for the second)."""
    teacher = create_model("vgg16", pretrained="none")[0]
    freeze(teacher)
    images = _canvas()
    crop = Cropper(np.array([[32, 56]] * 3), 32, seed=0)
    targets = TeacherTargets(images, torch.device("cpu"), amp=False, batch_size=4, views=8, crops=crop)
    targets.refresh(teacher)
    assert targets.maps.shape[1] == crop.views * 8 and crop.views == 7
    canvas = torch.from_numpy(images).permute(0, 3, 1, 2)
    index, ops = torch.tensor([1, 1, 2]), torch.tensor([3, 3, 5])
    for views in (torch.tensor([0, 6, 2]), torch.tensor([6, 0, 2])):  # then again, from the cache
        offsets = crop.offsets(index, views)
        x = dihedral(crop_batch(canvas[index], offsets, 32), ops)
        with torch.no_grad():
            live = teacher(x).fused
        got = targets(x, BatchMeta(index, ops, views, offsets))
        assert torch.allclose(got, live, atol=1e-3)  # float16 storage
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # two crops of image 1, two targets


def test_mean8_targets_cover_every_crop_position():
    teacher = create_model("vgg16", pretrained="none")[0]
    freeze(teacher)
    images = _canvas(n=2, w=40)
    crop = Cropper(np.array([[32, 40], [32, 36]]), 32, seed=0)
    targets = TeacherTargets(images, torch.device("cpu"), amp=False, batch_size=4, mode="mean8", crops=crop)
    targets.refresh(teacher)
    index, views = torch.tensor([0, 1]), torch.tensor([2, 1])  # image 0: 3 positions, image 1: 2
    x = crop_batch(torch.from_numpy(images).permute(0, 3, 1, 2), crop.offsets(index, views), 32)
    live = TeacherTargets(images, torch.device("cpu"), amp=False, batch_size=4, mode="mean8", cache=False)
    live.refresh(teacher)
    assert torch.allclose(targets(x, BatchMeta(index, None, views)), live(x, BatchMeta(index, None)), atol=1e-3)


class RedDetector(torch.nn.Module):
    """Fused map = 1 where the red channel is above 128 (a map that follows the image exactly)."""

    def forward(self, x):
        fused = (x[:, :1].float() > 128 / 255.0 if x.dtype != torch.uint8 else x[:, :1] > 128).float()
        return MILOutput(sides=[fused], fused=fused)


def test_evaluation_scores_the_whole_image_from_its_tiles():
    h, w, tile = 40, 90, 32  # one image wider than two tiles, one smaller than a tile (padded canvas)
    images = np.full((2, h, w, 3), 255, np.uint8)
    truth = np.zeros((2, h, w), bool)
    truth[0, 5:35, 60:88] = True  # only in the right part: a centre crop would miss it
    truth[1, 2:10, 3:20] = True
    images[truth] = (250, 10, 10)
    images[:, :, :, 0][~truth] = 0
    images[1, 20:] = images[1, :, 24:] = (250, 0, 0)  # red outside the image's 20 x 24: padding, not scored
    sizes = np.array([[h, w], [20, 24]])
    arrays = CachedArrays(images, truth, np.array([1, 1]), np.array([True, True]), sizes, tile)
    assert len([t for t in image_tiles(sizes, tile) if t[0] == 0]) == 2 * 4
    probs = predict_fused(RedDetector(), arrays, torch.device("cpu"), batch_size=3, amp=False)
    assert probs.shape == (2, h, w) and np.array_equal(probs[0] > 0.5, truth[0])
    assert not probs[1, 20:].any() and not probs[1, :, 24:].any()
    summary, scores = score_predictions(probs, arrays, sigma=0.0, threshold=0.5)
    assert [s["f1"] for s in scores] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert summary["hd"] == pytest.approx(0.0)
