"""IKD-MIL as resumable phases: teacher -> fusion -> distill -> done.

After every epoch the run directory holds `checkpoint.pt` (everything needed to continue: models,
optimizer, RNG states, the `Selection`, metric rows), written atomically, so `--resume` after an
interruption continues exactly where it stopped. Model selection uses the validation split only;
`track_test` adds test F1 to metrics.csv for the plots and changes no decision.

Choices that differ from a literal reading of the paper, and why:
- Fusion fit: Adam at `fusion_lr` 1e-4. Adam moves a logit by about lr per step, so the paper's
  ~6,500 steps (10 epochs, 13k patches, batch 16) move it by at most ~0.65. Measured on a synthetic
  64 px teacher (12 epochs), largest weight after 6,500 steps: 1.0 at 1e-2 (already
  (0.006, 0.005, 0.988) after 800 steps, as the issue found), 0.992 at 1e-3, 0.90 at 3e-4, 0.57-0.59
  at 1e-4 (post-/pre-pool taps), and no fitted weights beat uniform on validation by more than
  0.004 F1. So the fitted weights are kept only when they beat the stage-1 (uniform) weights on
  validation, and a weight above 0.9 is warned about. `fusion_weights` fixes them instead (the
  authors' code: 0.3, 0.3, 0.4).
- Stage 2: the student's fusion weights copy the teacher's and stay frozen, as the paper fixes them
  after the separate fit. Trained, they would drift: stage 2 runs ~366k steps at lr 5e-5, 28x the
  lr x steps of the fit that moved a weight to 0.57 above. `train_student_fusion` trains them.
- Validation every `val_every` epochs; at a swap check (every `swap_every` epochs) the *best*
  student of the cycle, not the last, becomes the teacher, and the old teacher becomes the student.
- Teacher targets are exactly the live teacher's on the augmented batch (see `TeacherTargets`).

metrics.csv columns: `phase` (teacher / fusion / distill), `epoch`, `loss`, `val_f1` (absent when
validation lacks masks), `val_auc` (image-level AUC, absent when validation lacks a class), `val_score`
(the one of them `--selection` compares, see `ikdmil.engine.run`), `test_f1` (only with `track_test`),
`swap` (stage 2: 1 when a swap happened after the epoch, else 0), then `kd`, `wce`, `cycle` (swaps
before the epoch), `teacher_score` (the frozen teacher's val_score), `fusion_weights`, `fusion_kept`
(1 when the fitted weights beat uniform), `seconds`.
"""

from __future__ import annotations

import copy
import logging
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

logger = logging.getLogger(__name__)

PHASES = ("teacher", "fusion", "distill", "done")
COLLAPSE_WARNING = 0.9  # a fitted fusion weight above this: the fused map is nearly one side


@dataclass
class Best:
    """A model state kept because it scored best on validation."""

    score: float
    epoch: int
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: MILSegmenter, score: float, epoch: int) -> Best:
        return cls(score, epoch, copy.deepcopy(model.state_dict()))


def _best_state(b: Best | None) -> dict | None:
    return None if b is None else {"score": b.score, "epoch": b.epoch, "state": b.state}


def _best_from(b: dict | None) -> Best | None:
    return None if b is None else Best(b["score"], b["epoch"], b["state"])


@dataclass
class Selection:
    """What model selection has seen so far (all on the validation split); saved in checkpoints."""

    teacher_best: Best | None = None  # best stage-1 epoch
    student_best: Best | None = None  # best student of stage 2 (-> student.safetensors)
    cycle_best: Best | None = None  # best student since the last swap (-> the next teacher)
    stage1_score: float | None = None  # the teacher with its stage-1 (uniform) fusion weights
    teacher_score: float | None = None  # the current (frozen) teacher's validation score
    swaps: int = 0
    epochs_run: int = 0  # epochs of all phases together (reshuffles the DistributedSampler)

    def to_state(self) -> dict:
        """Plain dicts and tensors only, so `torch.load(weights_only=True)` reads it back."""
        return {"teacher_best": _best_state(self.teacher_best), "student_best": _best_state(self.student_best),
                "cycle_best": _best_state(self.cycle_best), "stage1_score": self.stage1_score,
                "teacher_score": self.teacher_score, "swaps": self.swaps, "epochs_run": self.epochs_run}

    @classmethod
    def from_state(cls, state: dict) -> Selection:
        return cls(_best_from(state["teacher_best"]), _best_from(state["student_best"]),
                   _best_from(state["cycle_best"]), state["stage1_score"], state["teacher_score"],
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
        self.teacher = self._new_model(0)
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

    def _new_model(self, seed_offset: int) -> MILSegmenter:
        """`new_model` with the fixed `fusion_weights`, when given."""
        model = self.new_model(seed_offset)
        fixed = self.cfg.fixed_fusion_weights()
        if fixed is not None:
            if len(fixed) != len(model.fusion_logits):
                raise IkdmilError(f"--fusion-weights gives {len(fixed)} weights but {self.cfg.backbone!r} has "
                                  f"{len(model.fusion_logits)} side outputs; give one weight per side")
            with torch.no_grad():
                model.fusion_logits.copy_(torch.tensor(fixed).log())
        return model

    def _start(self) -> None:
        if self.phase != "distill":
            return
        loaded, _ = load_model(self.teacher_file, self.device, expect_backbone=self.cfg.backbone)
        if loaded.side_taps != self.teacher.side_taps:  # same weights, another model: refuse to mix them
            raise IkdmilError(f"{self.teacher_file}: a teacher with {loaded.side_taps} side taps, but this run "
                              f"builds {self.teacher.side_taps}; pass --side-taps {loaded.side_taps}")
        self.teacher.load_state_dict(loaded.state_dict())
        self.sel.teacher_score = self.val_score(self.teacher)
        self.save_model_file(self.teacher, "teacher.safetensors", role="teacher", val_score=self.sel.teacher_score,
                             source=str(self.teacher_file))

    def _restore(self) -> None:
        st = load_checkpoint(self.ckpt_path)
        self.rows = st.get("rows", [])
        load_state_checked(self.teacher, st["teacher"], self.ckpt_path)
        if st.get("student") is not None:  # built before the RNG states are restored: building seeds torch
            self.student = self._new_model(1)
            load_state_checked(self.student, st["student"], self.ckpt_path)
        self.restore_rng(st["rng"])
        self.phase, self.epoch = st["phase"], st["epoch"]
        try:
            self.sel = Selection.from_state(st["selection"])
        except (KeyError, TypeError):
            raise IkdmilError(f"{self.ckpt_path}: checkpoint from an older ikdmil; start the run again without "
                              "--resume (in a new --out)") from None
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
        return run_epoch(step, loader, self.device, self.augment, desc, self.progress, self.crop)

    def checkpoint_state(self) -> dict:
        return {"phase": self.phase, "epoch": self.epoch, "teacher": self.teacher.state_dict(),
                "student": self.student.state_dict() if self.student is not None else None,
                "optimizer": self.opt.state_dict() if self.opt is not None else None,
                "selection": self.sel.to_state()}

    # ----------------------------------------------------------------- stage 1: MIL teacher
    def teacher_phase(self) -> None:
        """Train the MIL teacher; keep its best epoch on validation."""
        cfg = self.cfg
        self.opt = self._resume_optimizer(teacher_optimizer(self.teacher, cfg.lr, cfg.weight_decay))
        step = make_teacher_step(self.train_view(self.teacher), self.opt, self.device, cfg.amp, cfg.teacher_loss)
        while self.epoch < cfg.teacher_epochs:
            t0 = time.perf_counter()
            losses = self._next_epoch(step, f"teacher {self.epoch + 1}/{cfg.teacher_epochs}")
            fields = self.validation_fields(self.teacher)
            score = fields["val_score"]
            self.epoch += 1
            if self.sel.teacher_best is None or score > self.sel.teacher_best.score:
                self.sel.teacher_best = Best.of(self.teacher, score, self.epoch)
            self.info(f"teacher epoch {self.epoch}/{cfg.teacher_epochs}  loss {losses['loss']:.4f}  val {score:.4f}")
            self.end_epoch({"phase": "teacher", "epoch": self.epoch, **losses, **fields}, t0)
        if self.sel.teacher_best is not None:  # selection on the validation split
            self.teacher.load_state_dict(self.sel.teacher_best.state)
        self.enter_phase("fusion")

    # ----------------------------------------------------------------- fusion-weight fit
    def fusion_phase(self) -> None:
        """Fit the teacher's fusion weights (unless fixed); writes teacher.safetensors."""
        cfg, teacher, sel = self.cfg, self.teacher, self.sel
        if cfg.fixed_fusion_weights() is None and cfg.fusion_epochs > 0:
            self._fit_fusion()
        if sel.teacher_score is None:
            sel.teacher_score = self.val_score(teacher)
        self.save_model_file(teacher, "teacher.safetensors", role="teacher", val_score=sel.teacher_score)
        self.info(f"teacher: fusion weights {[round(float(v), 3) for v in teacher.fusion_weights.detach()]}, "
                  f"val {sel.teacher_score:.4f} -> {self.run_dir / 'teacher.safetensors'}")
        self.enter_phase("distill" if self.last_phase == "distill" else "done")

    def _fit_fusion(self) -> None:
        cfg, teacher = self.cfg, self.teacher
        if self.sel.stage1_score is None:
            self.sel.stage1_score = self.val_score(teacher)
        self.opt = self._resume_optimizer(fusion_optimizer(teacher, cfg.fusion_lr))
        if self.dist.world > 1:  # three scalars: average their gradient across ranks directly
            teacher.fusion_logits.register_hook(all_reduce_mean)
        step = make_fusion_step(teacher, self.opt, self.device, cfg.amp, cfg.teacher_loss)
        while self.epoch < cfg.fusion_epochs:
            t0 = time.perf_counter()
            losses = self._next_epoch(step, f"fusion {self.epoch + 1}/{cfg.fusion_epochs}")
            self.epoch += 1
            w = [round(float(v), 4) for v in teacher.fusion_weights.detach()]
            row = {"phase": "fusion", "epoch": self.epoch, **losses, "fusion_weights": " ".join(map(str, w))}
            if self.epoch == cfg.fusion_epochs:
                row.update(self._judge_fusion())
            self.end_epoch(row, t0)

    def _judge_fusion(self) -> dict:
        """Keep the fitted fusion weights only if they beat the stage-1 (uniform) ones on validation."""
        teacher, sel = self.teacher, self.sel
        fields = self.validation_fields(teacher)
        w = [round(float(v), 3) for v in teacher.fusion_weights.detach()]
        kept = fields["val_score"] > sel.stage1_score
        if max(w) > COLLAPSE_WARNING and self.dist.is_main:
            logger.warning("fusion fit: weight %s > %s, the fused map is nearly one side (%s); lower --fusion-lr "
                           "or fix --fusion-weights", max(w), COLLAPSE_WARNING,
                           "kept: it scored better on validation" if kept else "discarded")
        if not kept:
            with torch.no_grad():
                teacher.fusion_logits.zero_()
        sel.teacher_score = fields["val_score"] if kept else sel.stage1_score
        self.info(f"fusion fit: weights {w}, val {fields['val_score']:.4f} vs uniform {sel.stage1_score:.4f}: "
                  f"{'kept' if kept else 'back to uniform'}")
        return {**fields, "fusion_kept": int(kept)}

    # ----------------------------------------------------------------- stage 2: iterative fusion KD
    def distill_phase(self) -> None:
        """Distil the frozen teacher into the student; each cycle's best student may become the teacher."""
        cfg = self.cfg
        freeze(self.teacher)
        if self.sel.teacher_score is None:
            self.sel.teacher_score = self.val_score(self.teacher)
        if self.student is None:
            self.student = self._new_model(1)
            if not cfg.train_student_fusion:  # the teacher's (fitted or fixed) weights, frozen
                with torch.no_grad():
                    self.student.fusion_logits.copy_(self.teacher.fusion_logits)
        self.opt = self._resume_optimizer(self._student_optimizer())
        self.targets = self._teacher_targets()
        step = self._cycle_step()
        while self.epoch < cfg.distill_epochs:
            t0 = time.perf_counter()
            losses = self._next_epoch(step, f"distill {self.epoch + 1}/{cfg.distill_epochs}")
            self.epoch += 1
            row = {"phase": "distill", "epoch": self.epoch, **losses, "cycle": self.sel.swaps,
                   "teacher_score": self.sel.teacher_score}
            if self._validation_due():
                self._score_student(row)
            swapped = self._maybe_swap()
            if swapped:
                step = self._cycle_step()
            row["swap"] = int(swapped)
            self.end_epoch(row, t0)
        if self.sel.student_best is not None:
            self.student.load_state_dict(self.sel.student_best.state)
            self.save_model_file(self.student, "student.safetensors", role="student",
                                 val_score=self.sel.student_best.score)
        self.enter_phase("done")

    def _student_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        return student_optimizer(self.student, cfg.lr, cfg.weight_decay, cfg.train_student_fusion)

    def _teacher_targets(self) -> TeacherTargets:
        cfg = self.cfg
        channels = len(self.teacher.side_heads) + 1 if cfg.kd_structure == "block" else 1
        targets = TeacherTargets(self.train_arrays.images, self.device, cfg.amp, cfg.batch_size * 2,
                                 views=8 if cfg.augment else 1, channels=channels, mode=cfg.teacher_target,
                                 cache=cfg.teacher_cache, crops=self.crop)
        if cfg.teacher_cache and not targets.cached:
            self.info("teacher maps do not fit in memory: the teacher runs live in every step")
        targets.refresh(self.teacher)
        return targets

    def _cycle_step(self) -> Step:
        """The distillation step of a cycle: the student is wrapped (DDP / compile) once per cycle."""
        cfg = self.cfg
        return make_distill_step(self.train_view(self.student), self.teacher, self.opt, self.device, cfg.amp,
                                 cfg.wce_scale, self.targets, cfg.kd_structure)

    def _validation_due(self) -> bool:
        cfg, epoch = self.cfg, self.epoch
        return (epoch % cfg.val_every == 0 or epoch == cfg.distill_epochs
                or (cfg.swap and epoch % cfg.swap_every == 0))

    def _score_student(self, row: dict) -> None:
        """Score the student on validation; keep it as the best of its cycle and of the run."""
        fields = self.validation_fields(self.student)
        row.update(fields)
        score, sel = fields["val_score"], self.sel
        best = None
        if sel.cycle_best is None or score > sel.cycle_best.score:
            best = sel.cycle_best = Best.of(self.student, score, self.epoch)
        if sel.student_best is None or score > sel.student_best.score:
            sel.student_best = best or Best.of(self.student, score, self.epoch)
        self.info(f"distill epoch {self.epoch}/{self.cfg.distill_epochs}  loss {row['loss']:.4f}  "
                  f"val teacher {sel.teacher_score:.4f} student {score:.4f}")

    def _maybe_swap(self) -> bool:
        """At a swap check: the cycle's best student becomes the teacher if it beats it on validation,
        and the old teacher becomes the student (new optimizer, new cycle). Returns whether it swapped."""
        cfg, sel = self.cfg, self.sel
        if not (cfg.swap and self.epoch % cfg.swap_every == 0 and self.epoch < cfg.distill_epochs):
            return False
        best = sel.cycle_best
        if best is None or not best.score > sel.teacher_score:
            return False
        swap_roles(self.teacher, self.student, new_teacher=best.state)
        self.targets.refresh(self.teacher)
        self.info(f"swap: the student of epoch {best.epoch} (val {best.score:.4f}) becomes the teacher "
                  f"(val {sel.teacher_score:.4f})")
        sel.teacher_score, sel.swaps, sel.cycle_best = best.score, sel.swaps + 1, None
        self.opt = self._student_optimizer()
        return True
