"""The epoch loop without per-step host syncs: device-side loss sums, gather-based augmentation."""

import copy
import sys

import numpy as np
import pytest
import torch
from fakes.models import TinyNet

from ikdmil.device import Distributed
from ikdmil.engine import loop
from ikdmil.engine.distill import TeacherTargets, freeze, make_distill_step, student_optimizer
from ikdmil.engine.loop import Augmenter, BatchMeta, MemoryLoader, dihedral, dihedral_inverse, run_epoch
from ikdmil.engine.teacher import make_teacher_step, teacher_optimizer
from ikdmil.errors import IkdmilError
from ikdmil.models.heads import MILSegmenter

CPU = torch.device("cpu")


def _reference_dihedral(x: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """The per-op definition (flip the width for bit 2, then rotate by 90° (op & 3) times), sample by sample."""
    out = []
    for xi, op in zip(x, ops.tolist()):
        y = xi.flip(-1) if op & 4 else xi
        out.append(torch.rot90(y, k=op & 3, dims=(-2, -1)))
    return torch.stack(out)


def test_dihedral_by_gather_equals_the_per_op_definition_and_keeps_channels_last():
    x = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    ops = torch.arange(16) % 8
    y = dihedral(x, ops)
    assert torch.equal(y, _reference_dihedral(x, ops))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(dihedral_inverse(y, ops), x)
    maps = torch.rand(8, 1, 5, 5)
    assert torch.equal(dihedral(maps, ops[:8].flip(0)), _reference_dihedral(maps, ops[:8].flip(0)))
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.zeros(1, 1, 4, 6), torch.zeros(1, dtype=torch.long))


def _models(seed: int = 0) -> MILSegmenter:
    torch.manual_seed(seed)
    return MILSegmenter(TinyNet(), "tiny").to(memory_format=torch.channels_last)


def _data(n: int = 10, size: int = 16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % 2


def _recording(step, seen: list):
    """`step`, also keeping each step's losses read on the host and its batch size (the old loop's inputs)."""
    def wrapped(x, y, meta):
        losses = step(x, y, meta)
        seen.append(({k: float(v) for k, v in losses.items()}, x.shape[0]))
        return losses
    return wrapped


def _per_step_average(seen: list) -> dict[str, float]:
    """What the loop computed before: sum of float(loss) x batch size over the steps, / images."""
    totals, n = {}, 0
    for losses, b in seen:
        n += b
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + v * b
    return {k: v / n for k, v in totals.items()}


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_epoch_losses_equal_the_per_step_average(stage):
    images, labels = _data()
    loader = MemoryLoader(images, labels, batch_size=4, seed=0, device=CPU)  # batches of 4, 4 and 2
    model = _models()
    if stage == "teacher":
        step = make_teacher_step(model, teacher_optimizer(model, 1e-3, 0.0), CPU, amp=False)
    else:
        teacher = copy.deepcopy(model)
        freeze(teacher)
        targets = TeacherTargets(images, CPU, amp=False, batch_size=4)
        targets.refresh(teacher)
        step = make_distill_step(model, teacher, student_optimizer(model, 1e-3, 0.0), CPU, False, 0.25, targets)
    for _ in range(2):  # the second epoch reads the teacher targets from the cache
        seen: list = []
        means = run_epoch(_recording(step, seen), loader, CPU, Augmenter(0, True), "test", progress=False)
        assert [b for _, b in seen] == [4, 4, 2]
        expected = _per_step_average(seen)
        assert set(means) == set(expected) == ({"loss"} if stage == "teacher" else {"loss", "kd", "wce"})
        for k in expected:
            assert means[k] == pytest.approx(expected[k], rel=1e-6, abs=1e-9), k


class _HostReads:
    """Counts the host reads of tensor values made from Python (float(), .item(), .tolist(), bool()).

    Reads inside torch.optim are left out: Adam keeps its step counters on the host (not capturable),
    so reading them never waits for a GPU.
    """

    NAMES = ("__float__", "item", "tolist", "__bool__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kwargs):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                self.count += not caller.startswith("torch.optim")
                return _original(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_a_training_epoch_reads_the_losses_once_not_per_step(monkeypatch):
    images, labels = _data(24)
    teacher, student = _models(0), _models(1)
    freeze(teacher)
    targets = TeacherTargets(images, CPU, amp=False, batch_size=4)
    targets.refresh(teacher)
    step = make_distill_step(student, teacher, student_optimizer(student, 1e-3, 0.0), CPU, False, 0.25, targets)
    reads = _HostReads(monkeypatch)
    counts = []
    for batch in (12, 4):  # 2 steps, then 6 steps
        loader = MemoryLoader(images, labels, batch_size=batch, seed=0, device=CPU)
        before = reads.count
        run_epoch(step, loader, CPU, Augmenter(0, True), "test", progress=False)
        counts.append(reads.count - before)
    assert counts == [1, 1]  # one read per epoch (the loss sums), whatever the number of steps
    monkeypatch.setattr(loop, "PROGRESS_EVERY", 2)
    before = reads.count
    run_epoch(step, loader, CPU, Augmenter(0, True), "test", progress=True)  # 6 steps, the bar every 2
    assert reads.count - before == 1 + 3


def test_a_nan_loss_at_any_step_stops_the_epoch_with_one_line():
    images, labels = _data(12)
    loader = MemoryLoader(images, labels, batch_size=4, seed=0, device=CPU)
    calls = []

    def step(x, y, meta):
        calls.append(1)
        value = torch.tensor(float("nan") if len(calls) == 2 else 0.5)
        return {"loss": value, "part": torch.tensor(1.0)}

    with pytest.raises(IkdmilError, match=r"^teacher 1/3: loss became nan; lower --lr"):
        run_epoch(step, loader, CPU, Augmenter(0, False), "teacher 1/3", progress=False)
    assert len(calls) == 3  # found once, at the end of the epoch


def test_batch_meta_gives_host_ops_without_a_device_read():
    ops = torch.tensor([1, 2])
    assert BatchMeta(torch.arange(2), ops, host_ops=ops.clone()).ops_on_host() is not ops  # the given host copy
    assert torch.equal(BatchMeta(torch.arange(2), ops).ops_on_host(), ops)  # read from `ops` when not given
    assert BatchMeta(torch.arange(2), None).ops_on_host() is None
    loader = MemoryLoader(*_data(6), batch_size=3, seed=0, device=CPU, dist=Distributed())
    x, _, index = next(iter(loader))
    aug, dev_ops, host_ops = Augmenter(0, True)(x)
    assert torch.equal(dev_ops, host_ops) and torch.equal(aug, dihedral(x, host_ops)) and index.device == CPU
