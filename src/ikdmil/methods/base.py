"""What the comparison rows share: resumable phases and the segmentation-network training phase.

`SegRun` is a `TrainingRun` (data, loader, augmentation, checkpoints, validation, `finish`) that runs
the named `phases` of a method in order. After every epoch, and at the end of every phase,
`checkpoint.pt` holds everything needed to continue: the networks (`nets`), the optimizer, the
per-image maps computed so far (`maps`: CAMs, accumulated attention, pseudo-masks), the best states
kept on validation (`best`), the results entries (`extra`), extra RNGs (`generators`) and the metric
rows, so `--resume` continues where the run stopped. Every network is built (and seeded) before
the checkpoint is read, so a resumed run draws the same random numbers as an uninterrupted one.

`train_segnet` is the phase of OEEM, OAA, PistoSeg and `supervised-unet`: the shared `SegNet`
(`ikdmil.models.segnet`) trained on per-image targets (pseudo-masks, or the pixel masks for the
supervised reference) with the method's loss; per-image targets live on the split's canvas at the
model's scale and are cropped and augmented with the images (the same crop, the same dihedral op),
the best epoch on validation is kept and written to `segnet.safetensors` (role
`segnet`), which `finish` scores on test and copies to `model.safetensors`.

The new layers (decoder, classifier head) train at `lr x head_lr_scale`, the encoder at `lr`: the
papers fine-tune a pretrained encoder under a randomly initialised head the same way (OEEM and OAA
use 10x for their new layers), and at the paper's lr of 5e-5 a new head would barely move in the
few epochs of the `cpu` profile.

metrics.csv columns: `phase` (the method's phase names), `epoch`, `loss` (and a method's parts, e.g.
`seg`, `consistency`), `val_f1` / `val_auc` / `val_score` (segmentation phases), `test_f1` (with `track_test`),
`val_acc` (the CAM classifier's image-level accuracy on validation), `seconds`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ikdmil.config import RunConfig
from ikdmil.device import autocast, to_device
from ikdmil.engine.loop import BatchMeta, Step, Timer, crop_batch, dihedral, load_checkpoint, run_epoch
from ikdmil.engine.pipeline import Best
from ikdmil.engine.run import TrainingRun
from ikdmil.models.checkpoint import load_state_checked
from ikdmil.models.segnet import SegNet, create_segnet

logger = logging.getLogger(__name__)

#: loss of a segmentation step: (predicted fused map, target map, image labels) -> scalar
SegLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def split_optimizer(model: nn.Module, new: list[nn.Parameter], lr: float, scale: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """Adam: `new` parameters at lr * scale, the rest (the pretrained encoder) at lr."""
    ids = {id(p) for p in new}
    old = [p for p in model.parameters() if id(p) not in ids]
    for p in model.parameters():
        p.requires_grad_(True)
    groups = [{"params": old, "lr": lr}, {"params": list(new), "lr": lr * scale}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def mask_tensor(masks) -> torch.Tensor:
    """(N,S,S) bool/uint8 masks (numpy or tensor) -> (N,1,S,S) uint8 tensor on the CPU."""
    t = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.array(masks))  # a copy: memmaps are read-only
    return t.to(torch.uint8)[:, None].contiguous()


class SegRun(TrainingRun):
    """A comparison method's run: `phases` in order, then `finish` over `roles` (see the module docstring).

    Subclasses set `method`, `phases` and `roles`, build their networks in `build` and implement
    `phase_<name>` for each phase (dashes become underscores).
    """

    method = ""
    phases: tuple[str, ...] = ()
    roles: tuple[str, ...] = ("segnet",)

    def __init__(self, cfg: RunConfig, resume: bool = False, progress: bool = True):
        super().__init__(dataclasses.replace(cfg, method=self.method), resume, progress)
        self.load_data()
        self.phase, self.epoch, self.epochs_run = self.phases[0], 0, 0
        self.opt: torch.optim.Optimizer | None = None
        self.nets: dict[str, nn.Module] = {}
        self.maps: dict[str, torch.Tensor] = {}  # per-image results so far (CPU tensors), kept in checkpoints
        self.best: dict[str, Best] = {}
        self.extra: dict = {}  # entries of results.json (JSON values only)
        self.generators: dict[str, torch.Generator] = {}  # RNGs of the method's own, saved with the others
        self.saved: dict | None = None

    # ----------------------------------------------------------------- main
    def build(self) -> None:
        """Create every network of the method into `self.nets` (before any checkpoint is read)."""
        raise NotImplementedError

    def run(self) -> dict:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        timer = Timer()
        self.setup_loader()
        self.build()
        if self.resume:
            self._restore()
        if self.dist.is_main:
            self.cfg.save(self.run_dir / "config.yaml")
        self.open_log(self.rows)
        try:
            for i, phase in enumerate(self.phases):
                if self.phase == phase:
                    getattr(self, "phase_" + phase.replace("-", "_"))()
                    self.enter_phase(self.phases[i + 1] if i + 1 < len(self.phases) else "done")
        finally:
            self.log.close()
        self.dist.barrier()
        return self.finish(0, timer(), self.roles, self.extra) if self.dist.is_main else {}

    def new_segnet(self, seed_offset: int) -> SegNet:
        """A fresh `SegNet` on the run's backbone (seeded by cfg.seed + seed_offset), on the device."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed + seed_offset)
        net, message = create_segnet(cfg.backbone, cfg.pretrained, cfg.decoder_width)
        if net.side_taps is not None:
            net.set_side_taps(cfg.side_taps)
        if seed_offset == 0:
            self.info(f"weights: {message}")
        return net.to(self.device, memory_format=torch.channels_last)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict:
        return {"phase": self.phase, "epoch": self.epoch, "epochs_run": self.epochs_run,
                "nets": {k: v.state_dict() for k, v in self.nets.items()},
                "optimizer": self.opt.state_dict() if self.opt is not None else None,
                "maps": dict(self.maps),
                "best": {k: {"score": b.score, "epoch": b.epoch, "state": b.state} for k, b in self.best.items()},
                "extra": dict(self.extra)}

    def rng_state(self) -> dict:
        return {**super().rng_state(), "method": {k: g.get_state() for k, g in self.generators.items()}}

    def restore_rng(self, rng: dict) -> None:
        super().restore_rng(rng)
        for k, state in rng.get("method", {}).items():
            if k in self.generators:
                self.generators[k].set_state(state)

    def _restore(self) -> None:
        st = load_checkpoint(self.ckpt_path)
        self.rows = st.get("rows", [])
        for k, state in st["nets"].items():
            load_state_checked(self.nets[k], state, self.ckpt_path)
        self.restore_rng(st["rng"])
        self.phase, self.epoch, self.epochs_run = st["phase"], st["epoch"], st["epochs_run"]
        self.maps = dict(st["maps"])
        self.best = {k: Best(b["score"], b["epoch"], b["state"]) for k, b in st["best"].items()}
        self.extra = dict(st["extra"])
        self.saved = st
        self.info(f"resuming {self.run_dir} at phase {self.phase}, epoch {self.epoch}")

    def resume_optimizer(self, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`opt`, with the saved optimizer state when the run stopped inside the current phase."""
        st, self.saved = self.saved, None
        if st is not None and st.get("optimizer") is not None and st["phase"] == self.phase and st["epoch"] > 0:
            opt.load_state_dict(st["optimizer"])
        self.opt = opt
        return opt

    def next_epoch(self, step: Step, desc: str) -> dict[str, float]:
        loader = self.epoch_loader(self.epochs_run)
        self.epochs_run += 1
        return run_epoch(step, loader, self.device, self.augment, desc, self.progress, self.crop)

    def validation_due(self, epoch: int, epochs: int) -> bool:
        return epoch % self.cfg.val_every == 0 or epoch == epochs

    # ----------------------------------------------------------------- the segmentation network
    def batch_targets(self, targets: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """The rows `meta.index` of per-image (N,1,H,W) canvas targets, cropped and augmented like the
        batch, float32."""
        t = targets[to_device(meta.index, targets.device)]
        t = to_device(crop_batch(t, meta.offsets, self.cfg.input_size), self.device).float()
        return dihedral(t, meta.ops) if meta.ops is not None else t

    def segnet_optimizer(self, net: SegNet) -> torch.optim.Optimizer:
        cfg = self.cfg
        return split_optimizer(net, net.new_parameters(), cfg.lr, cfg.head_lr_scale, cfg.weight_decay)

    def seg_step(self, view: nn.Module, opt: torch.optim.Optimizer, loss_fn: SegLoss,
                 targets: torch.Tensor) -> Step:
        """One step of the segmentation network on its per-image targets with `loss_fn`."""
        device, amp = self.device, self.cfg.amp

        def step(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta) -> dict[str, torch.Tensor]:
            view.train()
            t = self.batch_targets(targets, meta)
            with autocast(device, amp):
                out = view(x)
            loss = loss_fn(out.fused, t, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}

        return step

    def train_segnet(self, name: str, role: str, epochs: int,
                     step_for: Callable[[nn.Module, torch.optim.Optimizer], Step],
                     desc: str | None = None) -> None:
        """Train `self.nets[name]` for `epochs` with the step `step_for(view, optimizer)` builds; keep its
        best epoch on validation; write it to `ROLE.safetensors`."""
        net = self.nets[name]
        opt = self.resume_optimizer(self.segnet_optimizer(net))
        step = step_for(self.train_view(net), opt)
        desc = desc or self.phase
        while self.epoch < epochs:
            t0 = time.perf_counter()
            losses = self.next_epoch(step, f"{desc} {self.epoch + 1}/{epochs}")
            self.epoch += 1
            row = {"phase": self.phase, "epoch": self.epoch, **losses}
            if self.validation_due(self.epoch, epochs):
                fields = self.validation_fields(net)
                row.update(fields)
                best = self.best.get(name)
                if best is None or fields["val_score"] > best.score:
                    self.best[name] = Best.of(net, fields["val_score"], self.epoch)
                self.info(f"{desc} epoch {self.epoch}/{epochs}  loss {losses['loss']:.4f}  "
                          f"val {fields['val_score']:.4f}")
            self.end_epoch(row, t0)
        best = self.best[name]
        net.load_state_dict(best.state)
        self.save_model_file(net, f"{role}.safetensors", role=role, val_score=best.score, epoch=best.epoch)
        self.info(f"{role}: best epoch {best.epoch} (val {best.score:.4f}) -> {self.run_dir / (role + '.safetensors')}")

    @torch.no_grad()
    def predict_maps(self, net: nn.Module, images) -> torch.Tensor:
        """(N,H,W) float32 CPU fused maps of `net` (eval mode) for a split's `CachedArrays`, whole images."""
        from ikdmil.engine.evaluate import predict_fused

        cfg = self.cfg
        return torch.from_numpy(predict_fused(net, images, self.device, cfg.batch_size * 2, cfg.amp))
