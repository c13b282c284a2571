"""IKD-MIL as resumable phases: teacher -> fusion -> distill -> done.

After every epoch the run directory holds `checkpoint.pt` (everything needed to continue: models,
optimizer, RNG states, the `Selection`, metric rows), written atomically, so `--resume` after an
interruption continues exactly where it stopped. Model selection uses the validation split only.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ikdmil.config import RunConfig
from ikdmil.device import all_reduce_mean
from ikdmil.engine.distill import TeacherTargets, freeze, make_distill_step, student_optimizer, swap_roles
from ikdmil.engine.loop import Step, Timer, load_checkpoint, run_epoch
from ikdmil.engine.run import TrainingRun
from ikdmil.engine.teacher import fusion_optimizer, make_fusion_step, make_teacher_step, teacher_optimizer
from ikdmil.errors import IkdmilError
from ikdmil.models import MILSegmenter
from ikdmil.models.checkpoint import load_model, load_state_checked, read_model_meta

PHASES = ("teacher", "fusion", "distill", "done")
FUSION_LR = 1e-2


@dataclass
class Best:
    """A model state kept because it scored best on validation."""

    score: float
    epoch: int
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: MILSegmenter, score: float, epoch: int) -> "Best":
        return cls(score, epoch, copy.deepcopy(model.state_dict()))


@dataclass
class Selection:
    """What model selection has seen so far (all on the validation split); saved in checkpoints."""

    teacher_best: Best | None = None  # best stage-1 epoch
    student_best: Best | None = None  # best student of stage 2
    teacher_score: float | None = None  # the current (frozen) teacher's validation score
    swaps: int = 0
    epochs_run: int = 0  # epochs of all phases together (reshuffles the DistributedSampler)

    def to_state(self) -> dict:
        """Plain dicts and tensors only, so `torch.load(weights_only=True)` reads it back."""
        def best(b: Best | None):
            return None if b is None else {"score": b.score, "epoch": b.epoch, "state": b.state}

        return {"teacher_best": best(self.teacher_best), "student_best": best(self.student_best),
                "teacher_score": self.teacher_score, "swaps": self.swaps, "epochs_run": self.epochs_run}

    @classmethod
    def from_state(cls, state: dict) -> "Selection":
        def best(b: dict | None):
            return None if b is None else Best(b["score"], b["epoch"], b["state"])

        return cls(best(state["teacher_best"]), best(state["student_best"]), state["teacher_score"],
                   state["swaps"], state["epochs_run"])


class Pipeline(TrainingRun):
    """IKD-MIL training of one run directory, from `first_phase` to `last_phase`.

    Phases: `teacher` (stage-1 MIL teacher, best epoch on validation), `fusion` (the fusion-weight
    fit; writes `teacher.safetensors`), `distill` (stage 2: iterative fusion-knowledge distillation
    with role swaps; writes `student.safetensors`). Then `finish` writes `model.safetensors` (the
    better of the two on validation) and `results.json` (validation scores, test metrics).

    Args:
        cfg: the run's settings; `cfg.out` is the run directory.
        resume: continue from `cfg.out/checkpoint.pt` (bit-identically to an uninterrupted run).
        progress: show progress bars; messages go to `logging.getLogger("ikdmil...")`.
        first_phase: "teacher" (default) or "distill" (then `teacher_file` is the frozen teacher).
        last_phase: "distill" (default) or "fusion" (stop after the teacher, as `ikdmil train`).
        teacher_file: a teacher model file, for `first_phase="distill"`.

    Returns:
        `run()` returns the results dict also written to `results.json` (empty on ranks > 0).

    Example:
        >>> cfg = RunConfig(data="data/glas", out="runs/glas", input_size=128)
        >>> results = Pipeline(cfg).run()
        >>> results["selected"], results["models"]["student"]["test"]["f1"]
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True,
                 first_phase: str = "teacher", last_phase: str = "distill", teacher_file: str | None = None):
        super().__init__(cfg, resume, progress)
        self.first_phase, self.last_phase = first_phase, last_phase
        self.teacher_file = teacher_file
        if first_phase == "distill" and not resume:
            if not teacher_file:
                raise IkdmilError("distill needs a teacher: pass --teacher MODEL.safetensors")
            read_model_meta(teacher_file)  # fail before any work on a foreign or missing file
        self.load_data()
        self.teacher: MILSegmenter | None = None
        self.student: MILSegmenter | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.phase, self.epoch = first_phase, 0
        self.sel = Selection()
        self.saved: dict | None = None  # the checkpoint resumed from, until its phase is entered

    # ----------------------------------------------------------------- main
    def run(self) -> dict:
        """Run the remaining phases, then `finish`; returns the results dict."""
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        timer = Timer()
        self.setup_loader()
        self.teacher = self.new_model(0)
        if self.resume:
            self._restore()
        else:
            self._start()
        if self.dist.is_main:
            self.cfg.save(self.run_dir / "config.yaml")  # on --resume too: options given then are recorded
        self.open_log(self.rows)
        try:
            if self.phase == "teacher":
                self.teacher_phase()
            if self.phase == "fusion":
                self.fusion_phase()
            if self.phase == "distill":
                self.distill_phase()
        finally:
            self.log.close()
        self.dist.barrier()  # rank 0's model files are complete before anyone reads them
        return self.finish(self.sel.swaps, timer()) if self.dist.is_main else {}

    def _start(self) -> None:
        if self.phase != "distill":
            return
        loaded, _ = load_model(self.teacher_file, self.device, expect_backbone=self.cfg.backbone)
        self.teacher.load_state_dict(loaded.state_dict())
        self.sel.teacher_score = self.val_score(self.teacher)
        self.save_model_file(self.teacher, "teacher.safetensors", role="teacher", val_score=self.sel.teacher_score,
                             source=str(self.teacher_file))

    def _restore(self) -> None:
        st = load_checkpoint(self.ckpt_path)
        self.rows = st.get("rows", [])
        self.restore_rng(st["rng"])
        load_state_checked(self.teacher, st["teacher"], self.ckpt_path)
        self.phase, self.epoch = st["phase"], st["epoch"]
        self.sel = Selection.from_state(st["selection"])
        if st.get("student") is not None:
            self.student = self.new_model(1)
            load_state_checked(self.student, st["student"], self.ckpt_path)
        self.saved = st
        self.info(f"resuming {self.run_dir} at phase {self.phase}, epoch {self.epoch}")

    def _resume_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Load the saved optimizer state into `opt` when the run stopped inside this phase."""
        st, self.saved = self.saved, None
        if st is not None and st.get("optimizer") is not None and st["phase"] == self.phase:
            opt.load_state_dict(st["optimizer"])
        return opt

    def _next_epoch(self, step: Step, desc: str) -> dict[str, float]:
        """One training epoch of the current phase; returns its mean losses."""
        loader = self.epoch_loader(self.sel.epochs_run)
        self.sel.epochs_run += 1
        return run_epoch(step, loader, self.device, self.augment, desc, self.progress)

    def _state(self) -> dict:
        return {"phase": self.phase, "epoch": self.epoch, "teacher": self.teacher.state_dict(),
                "student": self.student.state_dict() if self.student is not None else None,
                "optimizer": self.opt.state_dict() if self.opt is not None else None,
                "selection": self.sel.to_state()}

    def _enter(self, phase: str) -> None:
        self.phase, self.epoch, self.opt = phase, 0, None
        self.checkpoint(self._state())

    # ----------------------------------------------------------------- stage 1: MIL teacher
    def teacher_phase(self) -> None:
        """Train the MIL teacher; keep its best epoch on validation."""
        cfg = self.cfg
        self.opt = self._resume_optimizer(teacher_optimizer(self.teacher, cfg.lr, cfg.weight_decay))
        step = make_teacher_step(self.train_view(self.teacher), self.opt, self.device, cfg.amp, cfg.teacher_loss)
        while self.epoch < cfg.teacher_epochs:
            t0 = time.perf_counter()
            losses = self._next_epoch(step, f"teacher {self.epoch + 1}/{cfg.teacher_epochs}")
            score = self.val_score(self.teacher)
            self.epoch += 1
            if self.sel.teacher_best is None or score > self.sel.teacher_best.score:
                self.sel.teacher_best = Best.of(self.teacher, score, self.epoch)
            self.log.add({"phase": "teacher", "epoch": self.epoch, **losses, "val_teacher": score,
                          "seconds": round(time.perf_counter() - t0, 3)})
            self.info(f"teacher epoch {self.epoch}/{cfg.teacher_epochs}  loss {losses['loss']:.4f}  val {score:.4f}")
            self.checkpoint(self._state())
        if self.sel.teacher_best is not None:  # selection on the validation split
            self.teacher.load_state_dict(self.sel.teacher_best.state)
        self._enter("fusion")

    # ----------------------------------------------------------------- fusion-weight fit
    def fusion_phase(self) -> None:
        """Fit the teacher's fusion weights (network frozen); writes teacher.safetensors."""
        cfg, teacher = self.cfg, self.teacher
        self.opt = self._resume_optimizer(fusion_optimizer(teacher, FUSION_LR))
        if self.dist.world > 1:  # three scalars: average their gradient across ranks directly
            teacher.fusion_logits.register_hook(all_reduce_mean)
        step = make_fusion_step(teacher, self.opt, self.device, cfg.amp, cfg.teacher_loss)
        while self.epoch < cfg.fusion_epochs:
            losses = self._next_epoch(step, f"fusion {self.epoch + 1}/{cfg.fusion_epochs}")
            self.epoch += 1
            w = [round(float(v), 4) for v in teacher.fusion_weights.detach()]
            self.log.add({"phase": "fusion", "epoch": self.epoch, **losses, "fusion_weights": " ".join(map(str, w))})
            self.checkpoint(self._state())
        self.sel.teacher_score = self.val_score(teacher)
        self.save_model_file(teacher, "teacher.safetensors", role="teacher", val_score=self.sel.teacher_score)
        self.info(f"teacher: fusion weights {[round(float(v), 3) for v in teacher.fusion_weights.detach()]}, "
                  f"val {self.sel.teacher_score:.4f} -> {self.run_dir / 'teacher.safetensors'}")
        self._enter("distill" if self.last_phase == "distill" else "done")

    # ----------------------------------------------------------------- stage 2: iterative fusion KD
    def distill_phase(self) -> None:
        """Distil the frozen teacher into the student; swap roles when the student wins on validation."""
        cfg = self.cfg
        freeze(self.teacher)
        if self.sel.teacher_score is None:
            self.sel.teacher_score = self.val_score(self.teacher)
        if self.student is None:
            self.student = self.new_model(1)
        self.opt = self._resume_optimizer(student_optimizer(self.student, cfg.lr, cfg.weight_decay))
        self.targets = None
        if cfg.teacher_cache:
            self.targets = TeacherTargets(self.train_arrays.images, self.device, cfg.amp, cfg.batch_size * 2)
            self.targets.refresh(self.teacher)
        step = self._cycle_step()
        while self.epoch < cfg.distill_epochs:
            t0 = time.perf_counter()
            losses = self._next_epoch(step, f"distill {self.epoch + 1}/{cfg.distill_epochs}")
            self.epoch += 1
            row = {"phase": "distill", "epoch": self.epoch, "cycle": self.sel.swaps, **losses}
            if self.epoch % cfg.swap_every == 0 or self.epoch == cfg.distill_epochs:
                if self._check_student(row):
                    step = self._cycle_step()
            row["seconds"] = round(time.perf_counter() - t0, 3)
            self.log.add(row)
            self.checkpoint(self._state())
        if self.sel.student_best is not None:
            self.student.load_state_dict(self.sel.student_best.state)
            self.save_model_file(self.student, "student.safetensors", role="student",
                                 val_score=self.sel.student_best.score)
        self._enter("done")

    def _cycle_step(self) -> Step:
        """The distillation step of a cycle: the student is wrapped (DDP / compile) once per cycle."""
        cfg = self.cfg
        return make_distill_step(self.train_view(self.student), self.teacher, self.opt, self.device, cfg.amp,
                                 cfg.wce_scale, self.targets)

    def _check_student(self, row: dict) -> bool:
        """Score the student on validation, keep it if best, swap roles if it beats the teacher.

        Returns whether a swap happened (then a new optimizer and cycle start)."""
        cfg, sel = self.cfg, self.sel
        s_score = self.val_score(self.student)
        row.update(val_teacher=sel.teacher_score, val_student=s_score, swapped=False)
        if sel.student_best is None or s_score > sel.student_best.score:
            sel.student_best = Best.of(self.student, s_score, self.epoch)
        swapped = s_score > sel.teacher_score and self.epoch < cfg.distill_epochs
        if swapped:
            swap_roles(self.teacher, self.student)
            if self.targets is not None:
                self.targets.refresh(self.teacher)
            sel.teacher_score = s_score
            sel.swaps += 1
            row["swapped"] = True
            self.opt = student_optimizer(self.student, cfg.lr, cfg.weight_decay)
        self.info(f"distill epoch {self.epoch}/{cfg.distill_epochs}  loss {row['loss']:.4f}  "
                  f"val teacher {row['val_teacher']:.4f} student {s_score:.4f}{'  -> swap' if swapped else ''}")
        return swapped
