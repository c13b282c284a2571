"""--stain-augment in the epoch loop: stage 1 and the student see jittered images, stage 2's teacher the plain ones."""

import numpy as np
import torch
from fakes.models import TinyNet

from ikdmil.engine.distill import TeacherTargets, freeze
from ikdmil.engine.loop import Augmenter, BatchMeta, MemoryLoader, dihedral, run_epoch
from ikdmil.models.heads import MILSegmenter
from ikdmil.prepare.synth import synth_image

CPU = torch.device("cpu")


def _images(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([synth_image(rng, 32, float(i % 2))[0] for i in range(n)])


def test_the_step_gets_jittered_images_and_the_plain_view_beside_them():
    images = _images()
    loader = MemoryLoader(images, np.arange(6) % 2, batch_size=3, seed=0, device=CPU)
    seen = []

    def step(x, y, meta):
        seen.append((x.clone(), meta))
        return {"loss": torch.zeros(())}

    run_epoch(step, loader, CPU, Augmenter(0, True, 0.1), "test", progress=False)
    for x, meta in seen:
        plain = dihedral(torch.from_numpy(images[meta.index.numpy()]).permute(0, 3, 1, 2), meta.ops)
        assert torch.equal(meta.plain, plain) and not torch.equal(x, plain)
    run_epoch(step, loader, CPU, Augmenter(0, True), "test", progress=False)
    assert seen[-1][1].plain is None  # no jitter: nothing extra


def test_stage_2_targets_are_the_teachers_map_of_the_plain_view():
    torch.manual_seed(0)
    teacher = MILSegmenter(TinyNet(), "tiny")
    freeze(teacher)
    images = _images(4)
    plain = torch.from_numpy(images).permute(0, 3, 1, 2)
    jittered = Augmenter(1, False, 0.3).jitter(plain)
    meta = BatchMeta(torch.arange(4), None, plain=plain)
    with torch.no_grad():
        expected, other = teacher(plain).fused, teacher(jittered).fused
    assert not torch.allclose(expected, other, atol=1e-3)
    for cache in (True, False):
        targets = TeacherTargets(images, CPU, amp=False, batch_size=4, views=1, cache=cache)
        targets.refresh(teacher)
        assert torch.allclose(targets(jittered, meta), expected, atol=1e-3)
