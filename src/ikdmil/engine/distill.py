"""Stage 2: iterative fusion-knowledge distillation with teacher/student role swaps."""

from __future__ import annotations

import copy

import numpy as np
import torch

from ikdmil.device import autocast, to_device
from ikdmil.engine.loop import BatchMeta, Cropper, Step, crop_batch, dihedral, dihedral_inverse
from ikdmil.losses import student_loss
from ikdmil.models.heads import MILOutput, MILSegmenter


def freeze(model: MILSegmenter) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(model: MILSegmenter) -> None:
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)


def student_optimizer(model: MILSegmenter, lr: float, weight_decay: float,
                      train_fusion: bool = True) -> torch.optim.Optimizer:
    """Adam over the student; its fusion weights only with `train_fusion` (else they stay frozen)."""
    unfreeze(model)
    if not train_fusion:
        model.fusion_logits.requires_grad_(False)
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def teacher_maps(teacher: MILSegmenter, x: torch.Tensor, device: torch.device, amp: bool,
                 channels: int = 1) -> torch.Tensor:
    """The frozen teacher's maps for the batch x as (B, channels, H, W) float32: the fused map
    (channels 1) or every side map then the fused map (channels k + 1, for block KD)."""
    with torch.no_grad(), autocast(device, amp):
        out = teacher(x)
    maps = out.all_maps() if channels > 1 else [out.fused]
    return torch.cat([m.float() for m in maps], dim=1)


def host_memory_available() -> int:
    """Bytes of host memory available now (Linux /proc/meminfo), or 2 GiB when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2 << 30


def storage_device(nbytes: int, device: torch.device) -> torch.device | None:
    """Where `nbytes` of cached maps go: the GPU when they fit a quarter of its free memory, else host
    memory when they fit a quarter of what is available, else None (no cache)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < free // 4:
            return device
    return torch.device("cpu") if nbytes < host_memory_available() // 4 else None


class TeacherTargets:
    """The stage-2 targets of the frozen teacher, cached within a cycle (the teacher does not change).

    `mode="view"` (the default, faithful): the target of a sample is exactly `teacher(aug(x))`, what
    the live teacher gives on the augmented batch. It is computed the first time a cycle meets image
    i under dihedral view v (on the batch itself) and kept per (image, view): at most one teacher
    forward per (image, view) per cycle, and never more than running it live. `views` is 8 with
    augmentation, 1 without. (The earlier cache stored teacher(x) once and returned aug(teacher(x)):
    5.9 % of the demo's pixels differed from the live target at 0.5, since the network is not
    rotation-equivariant.)

    `mode="mean8"` (named option): the teacher's map averaged over the 8 dihedral views, each mapped
    back, `mean_v v^-1(teacher(v(x)))`, computed for every image at `refresh` (8 forwards per image
    per cycle) and augmented like the image; the average commutes with the augmentation, so this too
    equals the live value on the augmented image.

    `channels`: 1 (fused map) or k + 1 (side maps and fused map, for block KD). Maps are stored as
    float16 (N, views, channels, S, S) where `storage_device` finds room; when there is none every
    call runs the teacher live (same values, without the float16 rounding).

    Random crops (`crops`, the run's `Cropper`): the crop is part of the view, so maps are kept per
    (image, crop position, dihedral view), `crops.views x views` slots per image, and the target is
    still exactly the live teacher's on the augmented crop; mean8 computes every crop position of
    every image at `refresh`.
    """

    def __init__(self, images, device: torch.device, amp: bool, batch_size: int, views: int = 8,
                 channels: int = 1, mode: str = "view", cache: bool = True, crops: Cropper | None = None):
        if mode not in ("view", "mean8"):
            raise ValueError(f"teacher target {mode!r}: choose view or mean8")
        self.images, self.device, self.amp, self.batch_size = images, device, amp, batch_size
        self.channels, self.mode, self.crops = channels, mode, crops
        self.views = 1 if mode == "mean8" else views
        self.positions = crops.views if crops is not None else 1
        self.teacher: MILSegmenter | None = None
        n = images.shape[0]
        h, w = (crops.size, crops.size) if crops is not None else images.shape[1:3]
        shape = (n, self.positions * self.views, channels, h, w)
        store = storage_device(2 * int(np.prod(shape)), device) if cache else None
        self.maps = self.known = None
        if store is not None:
            self.maps = torch.empty(shape, dtype=torch.float16, device=store)
            if store.type == "cpu" and device.type == "cuda":
                self.maps = self.maps.pin_memory()
            self.known = torch.zeros(shape[:2], dtype=torch.bool)  # on the host: read at every step

    @property
    def cached(self) -> bool:
        return self.maps is not None

    def refresh(self, teacher: MILSegmenter) -> None:
        """A new cycle: targets from now on come from `teacher` (forget the old teacher's maps)."""
        self.teacher = teacher
        if self.maps is None:
            return
        self.known.zero_()
        if self.mode == "mean8":
            rows = self._all_crops()
            for start in range(0, len(rows), self.batch_size):
                index, pos = rows[start:start + self.batch_size].unbind(1)
                mean = self._mean8(self._crop(index, pos).to(self.device))
                self.maps[index, pos] = mean.to(self.maps.device, torch.float16)
                self.known[index, pos] = True

    def _all_crops(self) -> torch.Tensor:
        """(M,2) every (image, crop position) of the training set."""
        if self.crops is None:
            return torch.stack([torch.arange(len(self.images)), torch.zeros(len(self.images), dtype=torch.long)], 1)
        return torch.tensor([(i, p) for i, (ys, xs) in enumerate(self.crops.starts) for p in range(len(ys) * len(xs))])

    def _crop(self, index: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,S,S) crops at positions `pos` of images `index`."""
        x = torch.from_numpy(np.stack([np.asarray(self.images[i]) for i in index.tolist()])).permute(0, 3, 1, 2)
        if self.crops is None:
            return x
        return crop_batch(x, self.crops.offsets(index, pos), self.crops.size)

    def _maps(self, x: torch.Tensor) -> torch.Tensor:
        return teacher_maps(self.teacher, x, self.device, self.amp, self.channels)

    def _mean8(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for v in range(8):
            ops = torch.full((x.shape[0],), v, device=x.device)
            back = dihedral_inverse(self._maps(dihedral(x, ops)), ops)
            total = back if total is None else total + back
        return total / 8

    def __call__(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Targets (B, channels, S, S) float32 for the augmented batch x (rows meta.index, crop positions
        meta.view, views meta.ops)."""
        if meta.plain is not None:  # stain jitter: the teacher sees the un-jittered view
            x = meta.plain
        if self.maps is None:
            return self._mean8(x) if self.mode == "mean8" else self._maps(x)
        store = self.maps.device
        index = meta.index.cpu()
        pos = torch.zeros_like(index) if meta.view is None else meta.view.cpu()
        if self.mode == "mean8":
            target = self.maps[to_device(index, store), to_device(pos, store)].to(self.device, non_blocking=True)
            return target.float() if meta.ops is None else dihedral(target.float(), meta.ops)
        view = pos * self.views + (0 if meta.ops is None else meta.ops_on_host())
        missing = (~self.known[index, view]).nonzero(as_tuple=True)[0]  # host bookkeeping: no GPU wait
        if len(missing):
            fresh = self._maps(x[to_device(missing, x.device)])
            # a host store (the maps did not fit the GPU) copies them back: a wait, first sight only
            rows, views = to_device(index[missing], store), to_device(view[missing], store)
            self.maps[rows, views] = fresh.to(store, torch.float16)
            self.known[index[missing], view[missing]] = True
        return self.maps[to_device(index, store), to_device(view, store)].to(self.device, non_blocking=True).float()


def make_distill_step(student: torch.nn.Module, teacher: MILSegmenter, opt: torch.optim.Optimizer,
                      device: torch.device, amp: bool, wce_scale: float,
                      targets: TeacherTargets | None = None, structure: str = "fusion") -> Step:
    """Only the student learns. The teacher's maps come from `targets` (cached per cycle) or, without
    it, from the frozen teacher run live under no_grad on the (augmented) batch. `structure` is the
    KD structure (losses.kd_loss); "block" uses the teacher's side maps too."""
    channels = len(teacher.side_heads) + 1 if structure == "block" else 1

    def step(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta | None = None) -> dict[str, torch.Tensor]:
        if targets is not None:
            maps = targets(x, meta)
        else:
            plain = x if meta is None or meta.plain is None else meta.plain  # the teacher never sees stain jitter
            maps = teacher_maps(teacher, plain, device, amp, channels)
        t_out = MILOutput(sides=list(maps[:, :-1].split(1, dim=1)), fused=maps[:, -1:])
        student.train()
        with autocast(device, amp):
            out = student(x)
        loss, parts = student_loss(out, t_out, y, wce_scale, structure)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), **parts}

    return step


def swap_roles(teacher: MILSegmenter, student: MILSegmenter, new_teacher: dict | None = None) -> None:
    """The student (or the state `new_teacher`, e.g. the best student of the cycle) becomes the frozen
    teacher, and the old teacher becomes the student.

    Weights are exchanged by deep copies of the state dicts (never aliases), so afterwards the two
    models hold independent tensors: the new teacher exactly the chosen student's weights.
    """
    t_state = copy.deepcopy(teacher.state_dict())
    s_state = copy.deepcopy(student.state_dict() if new_teacher is None else new_teacher)
    teacher.load_state_dict(s_state)
    student.load_state_dict(t_state)
    freeze(teacher)
    unfreeze(student)
