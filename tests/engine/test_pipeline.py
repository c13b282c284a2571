"""Stage 1, fusion fit, stage 2 swap policy, teacher-map cache, resume, selection on validation."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from ikdmil.engine.distill import freeze, make_distill_step, student_optimizer, swap_roles
from ikdmil.engine.pipeline import Pipeline
from ikdmil.engine.teacher import fusion_optimizer, make_fusion_step, make_teacher_step, teacher_optimizer
from ikdmil.errors import IkdmilError
from ikdmil.losses import mil_loss
from ikdmil.models import create_model


def _models(seed_a=0, seed_b=1):
    torch.manual_seed(seed_a)
    a, _ = create_model("vgg16", pretrained="none")
    torch.manual_seed(seed_b)
    b, _ = create_model("vgg16", pretrained="none")
    return a, b


def test_swap_exchanges_weights_without_aliasing():
    teacher, student = _models()
    freeze(teacher)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    swap_roles(teacher, student)
    for k in t_before:
        assert torch.equal(teacher.state_dict()[k], s_before[k]), k
        assert torch.equal(student.state_dict()[k], t_before[k]), k
    assert any(not torch.equal(teacher.state_dict()[k], student.state_dict()[k]) for k in t_before)
    # training the new student must not move the new teacher (no shared storage)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for k in t_before:
        assert torch.equal(teacher.state_dict()[k], s_before[k]), k
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert not teacher.training and student.training


def test_teacher_steps_reduce_the_mil_loss_and_keep_fusion_uniform():
    torch.manual_seed(0)
    model, _ = create_model("vgg16", pretrained="none")
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([1, 0, 1, 0])
    opt = teacher_optimizer(model, lr=1e-3, weight_decay=0.0)
    step = make_teacher_step(model, opt, torch.device("cpu"), amp=False)
    losses = [step(x, y)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0]
    assert torch.equal(model.fusion_logits.detach(), torch.zeros(3))


def test_fusion_fit_moves_only_the_fusion_weights():
    torch.manual_seed(0)
    model, _ = create_model("vgg16", pretrained="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = fusion_optimizer(model, lr=0.1)
    step = make_fusion_step(model, opt, torch.device("cpu"), amp=False)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([1, 0, 1, 0])
    for _ in range(5):
        step(x, y)
    after = model.state_dict()
    assert not torch.equal(after["fusion_logits"], before["fusion_logits"])
    for k in before:
        if k != "fusion_logits":
            assert torch.equal(after[k], before[k]), k
    assert float(model.fusion_weights.detach().sum()) == pytest.approx(1.0)


def test_distill_step_leaves_the_teacher_untouched():
    teacher, student = _models()
    freeze(teacher)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = student_optimizer(student, 1e-3, 0.0)
    step = make_distill_step(student, teacher, opt, torch.device("cpu"), amp=False, wce_scale=0.25)
    parts = {k: float(v) for k, v in step(torch.rand(4, 3, 32, 32), torch.tensor([1, 0, 1, 0])).items()}
    assert parts["loss"] == pytest.approx(parts["kd"] + 0.25 * parts["wce"], rel=1e-5)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_before[k]), k  # BN running stats too: the teacher runs in eval mode


def test_full_run_writes_outputs_and_selects_on_validation(tiny_synth, tmp_path, tiny_config):
    cfg = tiny_config(tiny_synth, tmp_path / "run")
    results = Pipeline(cfg, progress=False).run()
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "checkpoint.pt", "teacher.safetensors", "student.safetensors",
                 "model.safetensors", "results.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "results.json").read_text())
    assert saved["selected"] in ("teacher", "student")
    vals = {r: e["val_score"] for r, e in saved["models"].items()}
    assert vals[saved["selected"]] == max(vals.values())  # chosen on validation, never on test
    assert set(saved["models"]["student"]["test"]) >= {"f1", "iou", "hd", "hd95", "f1_pos", "f1_neg"}
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("phase,epoch")
    assert len(rows) == 1 + cfg.teacher_epochs + cfg.fusion_epochs + cfg.distill_epochs
    assert results["models"].keys() == saved["models"].keys()


def test_existing_run_needs_resume(tiny_synth, tmp_path, tiny_config):
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=0, distill_epochs=0)
    Pipeline(cfg, progress=False, last_phase="fusion").run()
    with pytest.raises(IkdmilError, match="--resume"):
        Pipeline(cfg, progress=False)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at, stain", [(("teacher", 1), 0.0), (("distill", 1), 0.0), (("teacher", 1), 0.1)])
def test_resume_continues_exactly_where_it_stopped(tiny_synth, tmp_path, crash_at, stain, tiny_config):
    """Also with --stain-augment: its draws come from the augmenter's generator, saved in the checkpoint."""
    straight = Pipeline(tiny_config(tiny_synth, tmp_path / "a", stain_augment=stain), progress=False)
    straight.run()

    cfg_b = tiny_config(tiny_synth, tmp_path / "b", stain_augment=stain)
    interrupted = Pipeline(cfg_b, progress=False)

    def crash(phase, epoch):
        if (phase, epoch) == crash_at:
            raise Crash

    interrupted.epoch_hooks.append(crash)
    with pytest.raises(Crash):
        interrupted.run()
    assert not (tmp_path / "b" / "results.json").exists()
    Pipeline(cfg_b, resume=True, progress=False).run()

    a = load_file(str(tmp_path / "a" / "student.safetensors"))
    b = load_file(str(tmp_path / "b" / "student.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert ra["swaps"] == rb["swaps"]
    assert ra["models"]["student"]["val_score"] == pytest.approx(rb["models"]["student"]["val_score"], abs=1e-6)


def test_validation_without_masks_selects_by_image_auc(tiny_synth, tmp_path, tiny_config):
    from ikdmil.data.manifest import Sample, load_samples, write_manifest

    samples = load_samples(tiny_synth)
    stripped = [Sample(s.image, s.label, None if s.split == "val" else s.mask, s.split) for s in samples]
    manifest = write_manifest(stripped, tmp_path / "nomask" / "manifest.csv")
    cfg = tiny_config(manifest, tmp_path / "run", teacher_epochs=1, distill_epochs=1)
    pipe = Pipeline(cfg, progress=False)
    assert not pipe.val_has_masks
    results = pipe.run()
    assert pipe.selection == "auc" and results["selection_metric"] == "val AUC (top 10 % mean)"
    assert 0.0 <= results["models"]["teacher"]["val_score"] <= 1.0


def test_mil_loss_is_finite_on_a_mixed_batch():
    out = create_model("vgg16", pretrained="none")[0](torch.rand(2, 3, 32, 32))
    assert torch.isfinite(mil_loss(out, torch.tensor([1, 0])))


def _images(n=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g).numpy()


def test_cached_teacher_gives_the_live_teacher_loss():
    from ikdmil.engine.distill import TeacherTargets
    from ikdmil.engine.loop import BatchMeta

    teacher, student = _models()
    freeze(teacher)
    images = _images()
    cpu = torch.device("cpu")
    targets = TeacherTargets(images, cpu, amp=False, batch_size=4)
    targets.refresh(teacher)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    y = torch.tensor([1, 0, 1, 0, 1, 1])
    meta = BatchMeta(torch.arange(6), None)
    results = []
    for cache in (None, targets):
        s = copy.deepcopy(student)
        opt = student_optimizer(s, 1e-3, 0.0)
        step = make_distill_step(s, teacher, opt, cpu, amp=False, wce_scale=0.25, targets=cache)
        losses = {k: float(v) for k, v in step(x, y, meta).items()}
        results.append((losses, {n: p.grad.clone() for n, p in s.named_parameters()}))
    (live, g_live), (cached, g_cached) = results
    for k in ("loss", "kd", "wce"):
        assert cached[k] == pytest.approx(live[k], rel=1e-3, abs=1e-4), k  # float16 storage of the maps
    for n in g_live:
        assert torch.allclose(g_live[n], g_cached[n], rtol=2e-2, atol=1e-5), n


def test_cached_targets_are_the_live_teacher_on_the_augmented_images():
    """The cache must give teacher(aug(x)), what the live teacher gives, not aug(teacher(x))."""
    from ikdmil.engine.distill import TeacherTargets
    from ikdmil.engine.loop import BatchMeta, dihedral

    teacher, _ = _models()
    freeze(teacher)
    images = _images(n=8)
    targets = TeacherTargets(images, torch.device("cpu"), amp=False, batch_size=3, views=8)
    targets.refresh(teacher)
    index = torch.tensor([5, 0, 7, 2, 1, 3, 6, 4])
    ops = torch.arange(8)  # every flip/rotation once
    x = dihedral(torch.from_numpy(images).permute(0, 3, 1, 2)[index], ops)
    with torch.no_grad():
        live = teacher(x).fused
        plain = teacher(torch.from_numpy(images).permute(0, 3, 1, 2)).fused
    first = targets(x, BatchMeta(index, ops))
    assert bool(targets.known[index, ops].all())
    again = targets(x, BatchMeta(index, ops))  # now read from the cache
    assert torch.allclose(first, live, atol=1e-3)  # float16 storage
    assert torch.equal(first, again)
    assert not torch.allclose(live, dihedral(plain[index], ops), atol=1e-3)  # what the old cache returned


def test_fast_path_matches_the_plain_path():
    """channels_last + cached teacher maps (fast) vs NCHW + live teacher (plain): same losses and
    gradients in stage 1 and stage 2 on one fixed batch (CPU, fp32)."""
    from ikdmil.engine.distill import TeacherTargets
    from ikdmil.engine.loop import BatchMeta

    cpu = torch.device("cpu")
    images = _images(n=4)
    y = torch.tensor([1, 0, 1, 0])
    meta = BatchMeta(torch.arange(4), None)
    results = {}
    for path in ("plain", "fast"):
        teacher, student = _models()
        fmt = torch.channels_last if path == "fast" else torch.contiguous_format
        teacher, student = teacher.to(memory_format=fmt), student.to(memory_format=fmt)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
        t_opt = teacher_optimizer(teacher, 0.0, 0.0)  # lr 0: gradients only, weights unchanged
        s1 = make_teacher_step(teacher, t_opt, cpu, amp=False)(x, y, meta)
        g1 = {n: p.grad.clone() for n, p in teacher.named_parameters() if p.grad is not None}
        freeze(teacher)
        targets = None
        if path == "fast":
            targets = TeacherTargets(images, cpu, amp=False, batch_size=2)
            targets.refresh(teacher)
        s_opt = student_optimizer(student, 0.0, 0.0)
        s2 = make_distill_step(student, teacher, s_opt, cpu, amp=False, wce_scale=0.25, targets=targets)(x, y, meta)
        g2 = {n: p.grad.clone() for n, p in student.named_parameters()}
        results[path] = (s1, g1, s2, g2)
    (p1, pg1, p2, pg2), (f1, fg1, f2, fg2) = results["plain"], results["fast"]
    assert float(f1["loss"]) == pytest.approx(float(p1["loss"]), rel=1e-5)
    assert float(f2["loss"]) == pytest.approx(float(p2["loss"]), rel=1e-3)  # float16 cached teacher maps
    def rel(fast, plain):
        """Relative difference of all gradients as one vector (conv biases before BatchNorm have a
        true gradient of zero, so a per-tensor ratio would compare rounding noise with noise)."""
        a = torch.cat([fast[n].flatten() for n in plain])
        b = torch.cat([plain[n].flatten() for n in plain])
        return float((a - b).norm() / b.norm())

    assert rel(fg1, pg1) < 1e-4
    assert rel(fg2, pg2) < 1e-2  # targets stored as float16
