"""What every training method shares: one run directory with its data, loader, checkpoint and results.

`TrainingRun` owns the parts of a run that do not depend on the method: the model's scale (from
the training data's mpp, `ikdmil.data.scale`, logged once and stored in every model file), the
train/val/test caches at that scale, the (GPU-resident or DataLoader) training loader, its random
crops (`Cropper`) and augmentation, model creation, the metrics log, atomic checkpoints with every
RNG state, validation scoring and, at the end, `finish`: the model for `predict` is picked on the
validation split, every model file is scored on the test split, and `results.json` is written. A
method subclasses it and adds its phases (see `ikdmil.engine.pipeline.Pipeline` for IKD,
`ikdmil.methods.base.SegRun` for the comparison rows); `ikdmil.methods` names the methods.

Training masks: the training split is cached *without* its masks (`reads_train_masks = False`), so
a weakly supervised method cannot read them even by mistake, and its training mask files are never
opened. Only a subclass that sets `reads_train_masks = True` (`supervised-unet`, the fully
supervised reference) gets them. Validation masks are read: model selection uses them.

Model selection (`RunConfig.selection`, resolved once in `load_data`): every best epoch, fusion-weight,
swap and final-model decision compares `val_score`, which is the validation F1 (`f1`; needs every
validation positive's mask) or the image-level ROC AUC of the fused map (`auc`: image labels only, see
`ikdmil.engine.evaluate.image_auc_of`); `auto` takes F1 when every mask is there, else AUC. Both are
logged whatever selects (metrics.csv `val_f1` when the masks exist, `val_auc` when both classes do).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ikdmil import __version__
from ikdmil.config import RESUME_MAY_CHANGE, RunConfig, resume_conflicts
from ikdmil.data.dataset import CachedArrays, PatchDataset, build_cache
from ikdmil.data.manifest import load_samples, select_split
from ikdmil.data.scale import choose_scale
from ikdmil.device import compile_mode_for, fits_on_device, setup_distributed
from ikdmil.engine.evaluate import evaluate_model, image_auc_of, predict_fused, score_predictions
from ikdmil.engine.loop import (
    Augmenter,
    Cropper,
    MemoryLoader,
    MetricsLog,
    make_loader,
    save_checkpoint,
    set_loader_epoch,
)
from ikdmil.errors import IkdmilError
from ikdmil.inference.settings import DEFAULT_MODEL_MPP
from ikdmil.io import remove_stale_temps, write_text
from ikdmil.models import MILSegmenter, create_model
from ikdmil.models.checkpoint import load_model, save_model
from ikdmil.stain import training_references, training_stats

logger = logging.getLogger(__name__)


class TrainingRun:
    """The data, loader, checkpoint and results of one run directory (`cfg.out`).

    Args:
        cfg: the run's settings (validated here).
        resume: continue the run whose `checkpoint.pt` is in `cfg.out`; without it an existing run
            there is an error.
        progress: show progress bars (tqdm). Messages go to `logging` whatever this says.
    """

    #: whether the training split is cached with its masks (only the fully supervised reference)
    reads_train_masks = False

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True):
        self.cfg = cfg.validate()
        self.run_dir = Path(cfg.out)
        self.dist, self.device = setup_distributed(cfg.device)
        self.progress = progress and self.dist.is_main
        self.epoch_hooks: list[Callable[[str, int], None]] = []  # called after each checkpoint
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        if not resume and self.ckpt_path.exists():
            raise IkdmilError(
                f"{self.run_dir}: a run already exists here; pass --resume to continue it or choose another --out"
            )
        self.resume = resume
        if resume and self.ckpt_path.exists():
            self._check_resume()
        self.rows: list[dict] = []

    def _check_resume(self) -> None:
        """Refuse a resume whose run-defining options differ from the run's (saved in config.yaml), and
        clear the temporaries a killed run left in the folder."""
        saved_path = self.run_dir / "config.yaml"
        if saved_path.is_file():
            bad = resume_conflicts(self.cfg, RunConfig.load(saved_path))
            if bad:
                raise IkdmilError(
                    f"{self.run_dir}: --resume with other settings than the run's: {'; '.join(bad)}; resume with "
                    f"the run's settings (only {', '.join(RESUME_MAY_CHANGE[:-1])} may change) or start a new --out"
                )
        if self.dist.is_main:
            remove_stale_temps(self.run_dir)

    def checkpoint_state(self) -> dict:
        """Everything the method needs to continue (models, optimizer, phase, epoch, selection)."""
        raise NotImplementedError  # each method's subclass says what its checkpoint holds

    def end_epoch(self, row: dict, t0: float) -> None:
        """Log the epoch's metrics row (with its seconds) and checkpoint the run."""
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.log.add(row)
        self.checkpoint(self.checkpoint_state())

    def enter_phase(self, phase: str) -> None:
        """Start `phase` at epoch 0 with no optimizer yet, and checkpoint that."""
        self.phase, self.epoch, self.opt = phase, 0, None
        self.checkpoint(self.checkpoint_state())

    def load_data(self) -> None:
        """Read the splits and build (or reuse) their preprocessing caches; rank 0 builds them."""
        cfg = self.cfg
        samples = load_samples(cfg.data)
        self.train_samples = select_split(samples, "train", cfg.data, need_both=True)
        self.val_samples = select_split(samples, "val", cfg.data, need_both=False)
        self.test_samples = [s for s in samples if s.split == "test"]
        cache = cfg.cache_dir or None
        self.scale = choose_scale(self.train_samples, cfg.input_size, cfg.model_mpp)
        self.info(f"model scale: {self.scale.describe()}; images rescaled isotropically, {cfg.input_size} px crops")
        if self.scale.factor > 0 and self.scale.mpp <= 0:
            self.info("note: the training data has no mpp column, so the model's µm/px stays unknown (predict then "
                      "needs --model-mpp); prepare the data with ikdmil prepare or fill the manifest's mpp column")
        if not self.dist.is_main:
            self.dist.barrier()  # rank 0 builds the preprocessing cache, the others then read it
        train = self.train_samples
        if not self.reads_train_masks:  # weak supervision: image labels only, mask files never opened
            train = [dataclasses.replace(sample, mask=None) for sample in train]
        self.train_arrays = self._cache(train, cache, "caching train")
        self.val_arrays = self._cache(self.val_samples, cache, "caching val")
        self.test_arrays = self._cache(self.test_samples, cache, "caching test") if self.test_samples else None
        if self.dist.is_main:
            self.dist.barrier()
        self.val_has_masks = bool(self.val_arrays.has_mask.all())
        self.selection = self._resolve_selection()

    def _cache(self, samples, cache: str | None, desc: str) -> CachedArrays:
        return build_cache(samples, self.cfg.input_size, cache, self.progress, desc, self.scale)

    # ----------------------------------------------------------------- building blocks
    def info(self, msg: str) -> None:
        """Log a message once per job (rank 0 only)."""
        if self.dist.is_main:
            logger.info(msg)

    def new_model(self, seed_offset: int) -> MILSegmenter:
        """A fresh model (seeded by cfg.seed + seed_offset) with the run's side taps, on the device."""
        torch.manual_seed(self.cfg.seed + seed_offset)
        model, message = create_model(self.cfg.backbone, self.cfg.pretrained)
        if model.side_taps is not None:  # VGG family; other backbones have fixed side outputs
            model.set_side_taps(self.cfg.side_taps)
        if seed_offset == 0:
            self.info(f"weights: {message}")
        # channels_last is faster for these convs on both CUDA and CPU (oneDNN): ~1.3x on 2 CPU cores
        return model.to(self.device, memory_format=torch.channels_last)

    def train_view(self, model: MILSegmenter) -> torch.nn.Module:
        """The module the optimiser steps through: DDP-wrapped under torchrun (call after setting
        requires_grad for the phase, since DDP registers exactly the trainable parameters)."""
        view = model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            view = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if not self.cfg.compile:
            return view
        mode = compile_mode_for(self.cfg.compile_mode, self.device)
        logger.debug("torch.compile mode %s", mode)
        return torch.compile(view, mode=mode)

    def setup_loader(self) -> None:
        """The training loader (GPU-resident when it fits, else a DataLoader) and the augmenter."""
        cfg = self.cfg
        images = self.train_arrays.images
        in_memory = cfg.loader == "memory" or (cfg.loader == "auto" and fits_on_device(images.nbytes, self.device))
        if in_memory:
            self.loader = MemoryLoader(images, self.train_arrays.labels, cfg.batch_size, cfg.seed, self.device,
                                       self.dist)
            self.loader_gen = self.loader.generator
        else:
            self.loader, self.loader_gen = make_loader(PatchDataset(self.train_arrays), cfg.batch_size, True,
                                                       cfg.seed, cfg.workers, self.device, self.dist)
        self.augment = Augmenter(cfg.seed, cfg.augment, cfg.stain_augment)
        self.crop = Cropper(self.train_arrays.sizes, cfg.input_size, cfg.seed)

    def epoch_loader(self, epochs_run: int):
        """The loader, reshuffled for the `epochs_run`-th epoch of the whole run (DistributedSampler)."""
        set_loader_epoch(self.loader, epochs_run)
        return self.loader

    def open_log(self, rows: list[dict]) -> None:
        self.log = MetricsLog(self.run_dir, rows, write=self.dist.is_main)

    def save_model_file(self, model: MILSegmenter, name: str, **meta) -> None:
        if self.dist.is_main:
            for key, value in self.scale.meta().items():  # mpp lets `predict` read slides at the model's scale
                meta.setdefault(key, value)
            meta.setdefault("method", self.cfg.method)
            stain = self.stain_meta()
            if stain is not None:  # lets `predict` warn about slides stained unlike the training data
                meta.setdefault("stain", stain)
            save_model(model, self.run_dir / name, input_size=self.cfg.input_size, **meta)

    def stain_meta(self) -> dict | None:
        """The training images' stain statistics for the model file (`ikdmil.stain`), measured once per run."""
        if not hasattr(self, "_stain_meta"):
            images = self.train_arrays.images
            stats = training_stats(images)
            self._stain_meta = None if stats is None else stats.to_meta()
            # predict --stain-normalise reinhard|macenko maps slides onto these (at predict's idea of the
            # model's µm/px)
            if self._stain_meta is not None:
                mpp = self.scale.mpp if self.scale.mpp > 0 else DEFAULT_MODEL_MPP
                self._stain_meta.update(training_references(images, mpp))
            if stats is None:
                logger.debug("too few training images with tissue for stain statistics; the model file gets none")
        return self._stain_meta

    def val_metrics(self, model: MILSegmenter) -> dict[str, float]:
        """`val_f1` (when every validation positive has a mask) and `val_auc` (when validation has both
        classes), from one pass over the validation split. Every rank scores the whole (small) split, so
        all ranks take the same decisions."""
        cfg, arrays = self.cfg, self.val_arrays
        probs = predict_fused(model, arrays, self.device, cfg.batch_size * 2, cfg.amp)
        out = {}
        if self.val_has_masks:
            out["val_f1"] = float(score_predictions(probs, arrays, cfg.eval_sigma, cfg.threshold, False)[0]["f1"])
        auc = image_auc_of(probs, arrays, cfg.eval_sigma, cfg.selection_top_percent)
        if not np.isnan(auc):
            out["val_auc"] = auc
        return out

    def val_score(self, model: MILSegmenter) -> float:
        """The score every selection compares: validation F1 or image AUC (`self.selection`)."""
        return self.val_metrics(model)[f"val_{self.selection}"]

    def validation_fields(self, model: MILSegmenter) -> dict:
        """A validation point for metrics.csv: `val_score` (the score selection uses), `val_f1` / `val_auc`
        (see `val_metrics`) and, with `track_test`, `test_f1`: for the plots only, never selects."""
        fields = self.val_metrics(model)
        fields["val_score"] = fields[f"val_{self.selection}"]
        if self.cfg.track_test and self.test_arrays is not None:
            fields["test_f1"] = self.test_f1(model)
        return fields

    def _resolve_selection(self) -> str:
        """`cfg.selection` made "f1" or "auc" for this data (logged when it is AUC); one line when the
        validation split cannot give it."""
        cfg = self.cfg
        labels = np.asarray(self.val_arrays.labels)
        missing = int((~np.asarray(self.val_arrays.has_mask) & (labels == 1)).sum())
        where = f"{cfg.data}: the validation split"
        if cfg.selection == "f1" and missing:
            raise IkdmilError(f"{where} has {missing} positive image(s) without a mask, which --selection f1 needs; "
                              "add their masks or pass --selection auc (image labels only)")
        chosen = "f1" if cfg.selection == "f1" or (cfg.selection == "auto" and not missing) else "auc"
        if chosen == "auc" and len(np.unique(labels)) < 2:
            has = "positive" if labels.all() else "negative"
            raise IkdmilError(f"{where} has only {has} images, and selection by image AUC (--selection "
                              f"{cfg.selection}) needs both; add images of the other class to val, or give every "
                              "validation positive a mask and pass --selection f1")
        if chosen == "auc":
            why = (f"{missing} validation positive(s) have no mask" if cfg.selection == "auto"
                   else "--selection auc")
            self.info(f"note: {why}; model selection uses the ROC AUC of the validation images' tumour scores "
                      f"(mean of the top {cfg.selection_top_percent:g} % of the fused map)")
        return chosen

    def selection_name(self) -> str:
        """What selects, for results.json: "val F1" or "val AUC (top K % mean)"."""
        if self.selection == "f1":
            return "val F1"
        return f"val AUC (top {self.cfg.selection_top_percent:g} % mean)"

    def test_f1(self, model: MILSegmenter) -> float | None:
        """F1 on the test split, for reporting (`track_test`); model selection never reads it."""
        cfg = self.cfg
        summary, _, _ = evaluate_model(model, self.test_arrays, self.device, cfg.eval_sigma, cfg.threshold,
                                       cfg.batch_size * 2, cfg.amp, distances=False)
        return summary.get("f1")

    # ----------------------------------------------------------------- checkpoints
    def rng_state(self) -> dict:
        """Every RNG a resumed run must continue: torch (CPU, and this rank's GPU), loader, augmentation."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"torch": torch.get_rng_state(), "cuda": cuda, "loader": self.loader_gen.get_state(),
                "aug": self.augment.gen.get_state(), "crop": self.crop.gen.get_state()}

    def restore_rng(self, rng: dict) -> None:
        self.loader_gen.set_state(rng["loader"])
        self.augment.gen.set_state(rng["aug"])
        if rng.get("crop") is not None:
            self.crop.gen.set_state(rng["crop"])
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def checkpoint(self, state: dict) -> None:
        """Write `checkpoint.pt` (state + RNG states + metric rows) atomically, then run the epoch hooks."""
        state = {**state, "rng": self.rng_state(), "rows": self.log.rows}
        if self.dist.is_main:
            save_checkpoint(self.ckpt_path, state)
        for hook in self.epoch_hooks:
            hook(state["phase"], state["epoch"])

    # ----------------------------------------------------------------- results
    def finish(self, swaps: int, seconds: float, roles: tuple[str, ...] = ("teacher", "student"),
               extra: dict | None = None) -> dict:
        """Pick the model for `predict` on validation among the files `ROLE.safetensors` of `roles`,
        evaluate each on test, write results.json (with `extra`'s entries, e.g. pseudo-mask scores)."""
        results = {"ikdmil": __version__, "method": self.cfg.method, "run_dir": str(self.run_dir),
                   "device": str(self.device), "host": platform.node(), "world_size": self.dist.world,
                   "seconds": round(seconds, 1), "swaps": swaps,
                   "selection_metric": self.selection_name(), **(extra or {}),
                   "models": {}}
        best = None
        for role in roles:
            path = self.run_dir / f"{role}.safetensors"
            if not path.is_file():
                continue
            model, meta = load_model(path, self.device)
            entry = {"file": path.name, "val_score": meta.get("val_score")}
            if self.test_arrays is not None:
                entry["test"] = self.test_summary(model, role)
            results["models"][role] = entry
            score = float("-inf") if entry["val_score"] is None else entry["val_score"]
            if best is None or score > best[0]:
                best = (score, role, meta, model)
        if best is not None:
            _, role, meta, model = best
            save_model(model, self.run_dir / "model.safetensors",
                       **{k: v for k, v in meta.items() if k not in ("format", "backbone")})
            results["selected"] = role
        write_text(self.run_dir / "results.json", json.dumps(results, indent=2))
        return results

    def test_summary(self, model: MILSegmenter, role: str) -> dict:
        cfg = self.cfg
        summary, _, _ = evaluate_model(model, self.test_arrays, self.device, cfg.eval_sigma, cfg.threshold,
                                       cfg.batch_size * 2, cfg.amp, self.progress, f"test {role}")
        return summary
