"""Issue 9, part 1: each method fix with a test that failed before it, and the experiment knobs."""

import copy
import csv
import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ikdmil.config import RunConfig
from ikdmil.engine import pipeline as pipeline_module
from ikdmil.engine.distill import TeacherTargets, freeze, make_distill_step, student_optimizer
from ikdmil.engine.loop import BatchMeta, dihedral, dihedral_inverse
from ikdmil.engine.pipeline import Pipeline
from ikdmil.engine.run import TrainingRun
from ikdmil.engine.teacher import fusion_optimizer, make_fusion_step
from ikdmil.errors import IkdmilError
from ikdmil.models import create_model
from ikdmil.models.checkpoint import load_model, read_model_meta, save_model

CPU = torch.device("cpu")


def _rows(run):
    with open(run / "metrics.csv") as fh:
        return list(csv.DictReader(fh))


def _validation_is(monkeypatch, score) -> None:
    """Replace the one validation pass (`TrainingRun.val_metrics`, behind every selection) by `score(run, model)`."""
    monkeypatch.setattr(TrainingRun, "val_metrics",
                        lambda self, model: {"val_f1": score(self, model), "val_auc": score(self, model)})


def _scripted(monkeypatch, scores, default=0.0):
    """Replace validation by scores looked up by (phase, epoch) at the time of the call."""
    _validation_is(monkeypatch, lambda run, model: scores.get((run.phase, run.epoch), default))


# ---------------------------------------------------------------- 1. fusion fit


class _FixedSides(nn.Module):
    """Three fixed side maps; the deepest is the best everywhere, so the MIL loss always pulls to it."""

    def __init__(self):
        super().__init__()
        self.fusion_logits = nn.Parameter(torch.zeros(3))
        pos = [torch.full((1, 1, 8, 8), v) for v in (0.35, 0.5, 0.97)]
        neg = [torch.full((1, 1, 8, 8), v) for v in (0.3, 0.2, 0.02)]
        self.maps = [torch.logit(torch.cat([p, n])) for p, n in zip(pos, neg)]

    @property
    def fusion_weights(self):
        return torch.softmax(self.fusion_logits, 0)

    def side_logits(self, x):
        return [m.clone() for m in self.maps]

    def fuse(self, sides):
        return sum(w * s for w, s in zip(self.fusion_weights, sides))


def _fit(lr, steps=6500):
    model = _FixedSides()
    step = make_fusion_step(model, fusion_optimizer(model, lr), CPU, amp=False)
    x, y = torch.zeros(2, 3, 8, 8), torch.tensor([1, 0])
    for _ in range(steps):
        step(x, y)
    return model.fusion_weights.detach()


def test_default_fusion_lr_stays_reasonable_over_the_papers_schedule():
    # ~6,500 steps = the paper's 10 fusion epochs on 13k patches at batch 16
    assert float(_fit(1e-2).max()) > 0.99  # the old fixed lr collapses onto the deepest side
    w = _fit(RunConfig().fusion_lr)
    assert float(w.max()) < 0.9 and int(w.argmax()) == 2  # it still moves towards the better side


def _judge_run(monkeypatch, tiny_synth, tmp_path, tiny_config, better: bool, caplog):
    def collapsing_step(model, opt, device, amp, loss="dice"):
        def step(x, y, meta=None):
            with torch.no_grad():
                model.fusion_logits.copy_(torch.tensor([0.0, 0.0, 5.0]))
            return {"loss": torch.zeros(())}
        return step

    monkeypatch.setattr(pipeline_module, "make_fusion_step", collapsing_step)
    sign = 1.0 if better else -1.0
    _validation_is(monkeypatch, lambda run, model: 0.5 + sign * float(model.fusion_logits.detach().abs().max()) / 10)
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=2, distill_epochs=0)
    with caplog.at_level(logging.WARNING, logger="ikdmil"):
        Pipeline(cfg, progress=False, last_phase="fusion").run()
    return load_file(str(tmp_path / "run" / "teacher.safetensors"))["fusion_logits"], _rows(tmp_path / "run")


def test_fitted_fusion_weights_are_discarded_when_they_do_not_beat_uniform(
        monkeypatch, tiny_synth, tmp_path, tiny_config, caplog):
    logits, rows = _judge_run(monkeypatch, tiny_synth, tmp_path, tiny_config, better=False, caplog=caplog)
    assert torch.equal(logits, torch.zeros(3))
    assert rows[-1]["phase"] == "fusion" and rows[-1]["fusion_kept"] == "0"
    assert any("0.987 > 0.9" in r.getMessage() and "discarded" in r.getMessage() for r in caplog.records)


def test_fitted_fusion_weights_are_kept_when_they_beat_uniform(monkeypatch, tiny_synth, tmp_path, tiny_config,
                                                               caplog):
    logits, rows = _judge_run(monkeypatch, tiny_synth, tmp_path, tiny_config, better=True, caplog=caplog)
    assert torch.equal(logits, torch.tensor([0.0, 0.0, 5.0]))
    assert rows[-1]["fusion_kept"] == "1" and float(rows[-1]["val_score"]) == pytest.approx(1.0)
    assert any(r.levelno == logging.WARNING and "kept" in r.getMessage() for r in caplog.records)


def test_fixed_fusion_weights_skip_the_fit_and_hold_in_both_stages(tiny_synth, tmp_path, tiny_config):
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=2, distill_epochs=2,
                      fusion_weights="0.3,0.3,0.4")
    Pipeline(cfg, progress=False).run()
    for name in ("teacher", "student", "model"):
        model, _ = load_model(tmp_path / "run" / f"{name}.safetensors")
        assert torch.allclose(model.fusion_weights, torch.tensor([0.3, 0.3, 0.4]), atol=1e-6), name
    assert not [r for r in _rows(tmp_path / "run") if r["phase"] == "fusion"]


def test_fusion_weights_must_fit_the_backbone(tiny_synth, tmp_path, tiny_config):
    with pytest.raises(IkdmilError, match="--fusion-weights"):
        tiny_config(tiny_synth, tmp_path / "a", fusion_weights="0.5,x").validate()
    cfg = tiny_config(tiny_synth, tmp_path / "b", fusion_weights="0.5,0.5")
    with pytest.raises(IkdmilError, match="2 weights but 'vgg16' has 3 side outputs"):
        Pipeline(cfg, progress=False).run()


@pytest.mark.parametrize("train_fusion", [False, True])
def test_student_fusion_weights_follow_train_student_fusion(train_fusion, tiny_synth, tmp_path, tiny_config):
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=0, distill_epochs=2,
                      fusion_weights="0.2,0.3,0.5", train_student_fusion=train_fusion, lr=1e-2, swap=False)
    pipe = Pipeline(cfg, progress=False)
    pipe.run()
    same = torch.equal(pipe.student.fusion_logits.detach(), pipe.teacher.fusion_logits.detach())
    assert same != train_fusion
    assert pipe.student.fusion_logits.requires_grad == train_fusion


# ---------------------------------------------------------------- 2. maps under bf16 autocast


@pytest.mark.parametrize("taps", ["pre-pool", "post-pool"])
def test_heads_and_fusion_run_in_float32_under_bf16_autocast(taps):
    torch.manual_seed(0)
    model, _ = create_model("vgg16", pretrained="none")
    model.set_side_taps(taps)
    model.eval()
    with torch.no_grad():
        for head in model.side_heads:
            head.bias.fill_(30.0)  # saturated sides: in bf16 the weights 1/3 sum to more than 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 32, 32))
    for m in out.all_maps():
        assert m.dtype == torch.float32
        assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    with torch.no_grad():
        for head in model.side_heads:
            head.bias.fill_(7.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        side = model(torch.zeros(1, 3, 32, 32)).sides[0]
    assert float(side.max()) < 1.0  # sigmoid(7 + small) is not rounded to exactly 1


# ---------------------------------------------------------------- 3. validation cadence, best of cycle, swap


def test_the_best_student_of_a_cycle_becomes_the_teacher(monkeypatch, tiny_synth, tmp_path, tiny_config):
    _scripted(monkeypatch, {("teacher", 0): 0.5, ("fusion", 0): 0.6, ("fusion", 1): 0.6,
                            ("distill", 1): 0.9, ("distill", 2): 0.5, ("distill", 3): 0.55, ("distill", 4): 0.4})
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=1, distill_epochs=4,
                      swap_every=3, val_every=1)
    pipe = Pipeline(cfg, progress=False)
    seen = {}
    pipe.epoch_hooks.append(lambda phase, epoch: seen.setdefault((phase, epoch), {
        k: v.clone() for k, v in pipe.student.state_dict().items()} if pipe.student is not None else None))
    results = pipe.run()
    assert results["swaps"] == 1
    for k, v in pipe.teacher.state_dict().items():  # the epoch-1 student, not the epoch-3 one
        assert torch.equal(v, seen[("distill", 1)][k]), k
    rows = [r for r in _rows(tmp_path / "run") if r["phase"] == "distill"]
    assert [float(r["val_score"]) for r in rows] == [0.9, 0.5, 0.55, 0.4]  # every validation recorded
    assert [r["swap"] for r in rows] == ["0", "0", "1", "0"]
    assert results["models"]["student"]["val_score"] == 0.9


def test_val_every_sets_the_validation_cadence(tiny_synth, tmp_path, tiny_config):
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=1, distill_epochs=5,
                      swap_every=4, val_every=2)
    Pipeline(cfg, progress=False).run()
    rows = [r for r in _rows(tmp_path / "run") if r["phase"] == "distill"]
    assert [r["epoch"] for r in rows if r["val_score"]] == ["2", "4", "5"]  # every 2nd, swap checks, the last


@pytest.mark.parametrize("swap", [True, False])
def test_swap_off_never_swaps(swap, monkeypatch, tiny_synth, tmp_path, tiny_config):
    _scripted(monkeypatch, {("distill", e): 0.5 + e / 10 for e in range(1, 5)}, default=0.1)
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=1, distill_epochs=4,
                      swap_every=1, swap=swap)
    results = Pipeline(cfg, progress=False).run()
    assert (results["swaps"] > 0) == swap
    assert {r["swap"] for r in _rows(tmp_path / "run") if r["phase"] == "distill"} == ({"0", "1"} if swap else {"0"})


def test_track_test_records_test_f1_and_changes_no_decision(tiny_synth, tmp_path, tiny_config):
    runs = {}
    for track in (False, True):
        cfg = tiny_config(tiny_synth, tmp_path / str(track), teacher_epochs=2, fusion_epochs=1, distill_epochs=3,
                          track_test=track)
        runs[track] = Pipeline(cfg, progress=False).run()
        runs[track].pop("run_dir"), runs[track].pop("seconds")
    assert runs[False] == runs[True]  # same selection, swaps, validation and test scores
    for name in ("teacher", "student", "model"):
        a = load_file(str(tmp_path / "False" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "True" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    plain, tracked = _rows(tmp_path / "False"), _rows(tmp_path / "True")
    assert "test_f1" not in plain[0] and all(r["test_f1"] for r in tracked if r["val_score"])
    assert list(tracked[0])[:8] == ["phase", "epoch", "loss", "val_f1", "val_auc", "val_score", "test_f1", "swap"]


# ---------------------------------------------------------------- 4. teacher targets under augmentation


def _two_models():
    torch.manual_seed(0)
    t, _ = create_model("vgg16", pretrained="none")
    torch.manual_seed(1)
    s, _ = create_model("vgg16", pretrained="none")
    freeze(t)
    return t, s


def _augmented_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    ops = torch.randint(0, 8, (n,), generator=g)
    x = dihedral(images.permute(0, 3, 1, 2), ops)
    return images.numpy(), x, BatchMeta(torch.arange(n), ops)


@pytest.mark.parametrize("structure", ["fusion", "block"])
def test_cached_and_live_targets_give_the_same_loss_with_augmentation(structure):
    teacher, student = _two_models()
    images, x, meta = _augmented_batch()
    y = torch.tensor([1, 0, 1, 0, 1, 1])
    channels = 4 if structure == "block" else 1
    results = []
    for cached in (False, True):
        targets = None
        if cached:
            targets = TeacherTargets(images, CPU, amp=False, batch_size=4, views=8, channels=channels)
            targets.refresh(teacher)
        s = copy.deepcopy(student)  # lr 0: the same student both times
        step = make_distill_step(s, teacher, student_optimizer(s, 0.0, 0.0), CPU, False, 0.25, targets, structure)
        results.append({k: float(v) for k, v in step(x, y, meta).items()})
    for k in ("loss", "kd", "wce"):
        assert results[1][k] == pytest.approx(results[0][k], rel=1e-3, abs=1e-4), k


def test_targets_fall_back_to_the_live_teacher_when_they_do_not_fit(monkeypatch):
    from ikdmil.engine import distill

    monkeypatch.setattr(distill, "host_memory_available", lambda: 0)
    teacher, _ = _two_models()
    images, x, meta = _augmented_batch()
    targets = TeacherTargets(images, CPU, amp=False, batch_size=4)
    targets.refresh(teacher)
    assert not targets.cached
    with torch.no_grad():
        assert torch.equal(targets(x, meta), teacher(x).fused)


@pytest.mark.parametrize("cache", [True, False])
def test_mean8_target_is_the_view_average_and_follows_the_augmentation(cache):
    teacher, _ = _two_models()
    images, x, meta = _augmented_batch()
    targets = TeacherTargets(images, CPU, amp=False, batch_size=4, mode="mean8", cache=cache)
    targets.refresh(teacher)
    plain = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        views = [dihedral_inverse(teacher(dihedral(plain, torch.full((6,), v))).fused, torch.full((6,), v))
                 for v in range(8)]
    expected = dihedral(torch.stack(views).mean(0), meta.ops)
    assert torch.allclose(targets(x, meta), expected, atol=1e-3)


def test_dihedral_inverse_undoes_every_op():
    x = torch.rand(8, 1, 5, 5)
    ops = torch.arange(8)
    assert torch.equal(dihedral_inverse(dihedral(x, ops), ops), x)


# ---------------------------------------------------------------- 6. side taps


def test_post_pool_taps_have_strides_2_4_8_and_model_files_remember_them(tmp_path):
    model, _ = create_model("vgg16", pretrained="none")
    assert model.side_taps == "pre-pool"  # the class default: files written before side taps load as they were
    sizes = [f.shape[-1] for f in model.backbone(torch.rand(1, 3, 64, 64))]
    assert sizes == [64, 32, 16]
    model.set_side_taps("post-pool")
    assert [f.shape[-1] for f in model.backbone(torch.rand(1, 3, 64, 64))] == [32, 16, 8]
    assert model.backbone.align_corners
    path = save_model(model, tmp_path / "m.safetensors", input_size=64)
    assert read_model_meta(path)["side_taps"] == "post-pool"
    loaded, _ = load_model(path)
    assert loaded.side_taps == "post-pool"
    model.eval(), loaded.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x).fused, model(x).fused)
    with pytest.raises(ValueError, match="fixed side outputs"):
        create_model("resnet18", pretrained="none")[0].set_side_taps("post-pool")


def test_runs_build_and_record_the_configured_side_taps(tiny_synth, tmp_path, tiny_config):
    assert RunConfig().side_taps == "post-pool"
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=0, distill_epochs=1,
                      side_taps="pre-pool")
    Pipeline(cfg, progress=False).run()
    for name in ("teacher", "student", "model"):
        assert read_model_meta(tmp_path / "run" / f"{name}.safetensors")["side_taps"] == "pre-pool"


# ---------------------------------------------------------------- 7. resume and RNG states


class _Crash(Exception):
    pass


def test_resume_keeps_the_global_rng_stream_of_stage_2(monkeypatch, tiny_synth, tmp_path, tiny_config):
    """A step that draws from torch's global RNG (as Swin's stochastic depth does) must see the same
    numbers after a resume; rebuilding the student reseeded torch after its state was restored."""
    real = pipeline_module.make_distill_step

    def noisy_step(*args, **kwargs):
        inner = real(*args, **kwargs)

        def step(x, y, meta=None):
            return inner(x, y, meta) | {"noise": torch.rand(())}
        return step

    monkeypatch.setattr(pipeline_module, "make_distill_step", noisy_step)
    straight = Pipeline(tiny_config(tiny_synth, tmp_path / "a", distill_epochs=3, swap=False), progress=False)
    straight.run()
    cfg = tiny_config(tiny_synth, tmp_path / "b", distill_epochs=3, swap=False)
    interrupted = Pipeline(cfg, progress=False)

    def crash(phase, epoch):
        if (phase, epoch) == ("distill", 1):
            raise _Crash

    interrupted.epoch_hooks.append(crash)
    with pytest.raises(_Crash):
        interrupted.run()
    Pipeline(cfg, resume=True, progress=False).run()
    noise = [[r.get("noise") for r in _rows(tmp_path / d) if r["phase"] == "distill"] for d in ("a", "b")]
    assert noise[0] == noise[1]


def test_checkpoints_carry_the_cuda_rng_state(monkeypatch):
    import types

    saved = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: saved.setdefault("cuda", state))
    gen = torch.Generator()
    run = types.SimpleNamespace(device=torch.device("cuda", 0), loader_gen=gen,
                                augment=types.SimpleNamespace(gen=torch.Generator()),
                                crop=types.SimpleNamespace(gen=torch.Generator()))
    state = TrainingRun.rng_state(run)
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    TrainingRun.restore_rng(run, state)
    assert torch.equal(saved["cuda"], state["cuda"])
    run.device = CPU  # on CPU nothing CUDA is touched
    assert TrainingRun.rng_state(run)["cuda"] is None


def test_distill_refuses_a_teacher_with_other_side_taps(tiny_synth, tmp_path, tiny_config):
    model, _ = create_model("vgg16", pretrained="none")  # pre-pool, like files written before side taps
    teacher = save_model(model, tmp_path / "old.safetensors", input_size=32)
    cfg = tiny_config(tiny_synth, tmp_path / "run", distill_epochs=1)
    with pytest.raises(IkdmilError, match="--side-taps pre-pool"):
        Pipeline(cfg, progress=False, first_phase="distill", teacher_file=str(teacher)).run()
