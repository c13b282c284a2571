"""The CAM stage shared by OEEM, OAA and PistoSeg: classifier -> class activation maps -> pseudo-masks.

Classifier (`CAMClassifier`): a registered backbone's deepest side feature map `f` (K channels),
global average pooling and a linear layer `(w, b)` give the image's tumour logit
`mean_xy(sum_k w_k f_k(x, y)) + b`, trained with binary cross-entropy on the image labels (Adam; the
linear layer at `lr x head_lr_scale`), augmented with the run's flips and rotations.

Class activation map (Zhou et al. 2016): `M(x, y) = sum_k w_k f_k(x, y)` (the logit before pooling,
without the bias), bilinearly upsampled to the input size, then per image `relu(M) / max relu(M)`,
so the maps lie in [0, 1] with 1 at the image's most tumour-like pixel (`normalise_cam`; an image
with no positive activation gets the zero map). The CAMs are taken with the classifier in eval mode.

Pseudo-masks: `map >= t` on positive images; a negative image's pseudo-mask is empty (its label says
there is no tumour). The threshold `t` (`choose_threshold`) is, unless `cam_threshold` fixes it, the
one of 0.05, 0.10, ..., 0.95 whose pseudo-masks of the *validation* images score the best mean
per-patch F1 against the validation masks (the metric of evaluation; ties: the lowest). Validation
masks are what every method here uses to select models, never the training masks. When no
validation positive has a mask, or selection is label-only (`--selection auc`, or `auto` with a
positive's mask missing: `ikdmil.engine.run`): Otsu's threshold of the training positives' maps
(the value that best separates their pixels into two classes), which needs no mask at all;
`results.json` records which rule was used (`pseudo_masks.threshold_rule`) and the pseudo-masks'
validation F1.

Each method writes its validation pseudo-masks to `pseudo_masks_val.npy` (uint8 (N,S,S), in the
order of the validation split), for the `pseudo-masks` figure (`ikdmil.experiment.plots`).

Where we differ from the papers: their classifiers are WideResNet-38 (OEEM), VGG16 (OAA) or
ResNet-38 (PistoSeg) with ImageNet weights we cannot download; ours is the run's registered backbone
(VGG16 blocks 1-3 by default, local ImageNet weights). They are multi-class (tissue types or gland /
background); tumour present / absent is our one class, so one logit and BCE replace the softmax CE.
OEEM thresholds its CAMs at a fixed value tuned by hand; we choose it on validation, as we select
every model.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ikdmil.data.dataset import CachedArrays
from ikdmil.device import autocast
from ikdmil.engine.evaluate import tile_batches
from ikdmil.engine.loop import BatchMeta, Step
from ikdmil.io import atomic_path
from ikdmil.losses import bce_loss
from ikdmil.methods.base import SegRun, split_optimizer
from ikdmil.models.heads import IMAGENET_MEAN, IMAGENET_STD

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95


class CAMClassifier(nn.Module):
    """Backbone -> deepest features -> global average pooling -> linear: one tumour logit per image."""

    def __init__(self, backbone: nn.Module, name: str):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.fc = nn.Linear(int(backbone.out_channels[-1]), 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's deepest feature map (B, K, h, w) of an RGB batch in [0,1] or uint8."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)[-1]

    def raw_cam(self, f: torch.Tensor) -> torch.Tensor:
        """`sum_k w_k f_k` (B,1,h,w) in float32, without the bias."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            return torch.einsum("bkhw,k->bhw", f.float(), self.fc.weight[0].float())[:, None]

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B,), raw CAM (B,1,h,w)) from one forward pass: logit = mean(raw CAM) + bias."""
        cam = self.raw_cam(self.features(x))
        return cam.mean(dim=(1, 2, 3)) + self.fc.bias[0].float(), cam

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward_with_cam` (so that a DDP / compiled wrapper returns the CAMs too)."""
        return self.forward_with_cam(x)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())

    @torch.no_grad()
    def cams(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised CAMs (B,1,H,W) in [0,1] at the input size (the caller sets eval mode)."""
        return normalise_cam(self.forward_with_cam(x)[1], x.shape[-2:])


def normalise_cam(raw: torch.Tensor, size) -> torch.Tensor:
    """Raw CAMs (B,1,h,w) -> bilinear to `size` -> per image relu(M) / max relu(M), in [0,1] float32."""
    m = F.interpolate(raw.float(), size=tuple(size), mode="bilinear", align_corners=False).clamp(min=0)
    peak = m.amax(dim=(1, 2, 3), keepdim=True)
    return torch.where(peak > 1e-12, m / peak.clamp(min=1e-12), torch.zeros_like(m))


def create_classifier(backbone: str, pretrained: str | None) -> tuple[CAMClassifier, str]:
    from ikdmil.models.registry import create_backbone

    net, message = create_backbone(backbone, pretrained)
    return CAMClassifier(net, backbone), message


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0,1] (maximum between-class variance), clipped to [0.05, 0.95]."""
    hist, edges = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    t = float(edges[int(np.argmax(between)) + 1])
    return float(np.clip(t, 0.05, 0.95))


def pseudo_masks(maps: torch.Tensor, labels, threshold: float) -> torch.Tensor:
    """(N,S,S) maps -> uint8 (N,S,S) masks: map >= threshold on positives, empty on negatives."""
    pos = torch.as_tensor(np.asarray(labels) == 1).view(-1, 1, 1)
    return ((maps >= threshold) & pos).to(torch.uint8)


def pseudo_mask_f1(maps: torch.Tensor, arrays: CachedArrays, threshold: float) -> float | None:
    """Mean per-patch F1 of the pseudo-masks of a split against its masks (None without scorable masks)."""
    from ikdmil.engine.evaluate import score_predictions

    gated = pseudo_masks(maps, arrays.labels, threshold).numpy().astype(np.float32)
    summary, _ = score_predictions(gated, arrays, 0.0, 0.5, distances=False)
    return summary.get("f1")


def choose_threshold(val_maps: torch.Tensor, val_arrays: CachedArrays, train_maps: torch.Tensor, train_labels,
                     fixed: float = 0.0, use_masks: bool = True) -> dict:
    """The pseudo-mask threshold (see the module docstring): {"threshold", "threshold_rule", "val_f1"}.

    `use_masks=False` (label-only selection, `--selection auc`) takes Otsu's threshold even when validation
    has masks; their F1 is still reported."""
    has_masks = bool((np.asarray(val_arrays.has_mask) & (np.asarray(val_arrays.labels) == 1)).any())
    if fixed > 0:
        t, rule = float(fixed), "fixed (--cam-threshold)"
    elif has_masks and use_masks:
        scores = [(pseudo_mask_f1(val_maps, val_arrays, t), t) for t in THRESHOLDS]
        best = max(s for s, _ in scores)
        t, rule = next(t for s, t in scores if s == best), "best validation F1"
    else:
        pos = np.asarray(train_labels) == 1
        values = train_maps[torch.from_numpy(pos)].numpy().ravel()
        why = "validation has no masks" if not has_masks else "label-only selection"
        t, rule = otsu_threshold(values), f"Otsu of the training positives' maps ({why})"
    return {"threshold": t, "threshold_rule": rule,
            "val_f1": pseudo_mask_f1(val_maps, val_arrays, t) if has_masks else None}


def save_array(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


class CamRun(SegRun):
    """A `SegRun` whose first phase trains the CAM classifier (`self.nets["classifier"]`) and whose last
    trains the segmentation network on `self.maps["pseudo"]` with `seg_loss` (BCE unless a method says)."""

    @staticmethod
    def seg_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return bce_loss(pred, target)

    def phase_segnet(self) -> None:
        targets = self.maps["pseudo"]
        self.train_segnet("segnet", "segnet", self.cfg.seg_epochs,
                          lambda view, opt: self.seg_step(view, opt, self.seg_loss, targets), f"{self.method} segnet")

    def build_classifier(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        net, message = create_classifier(cfg.backbone, cfg.pretrained)
        if getattr(net.backbone, "side_taps", None) is not None:
            net.backbone.set_side_taps(cfg.side_taps)
        self.info(f"weights: {message}")
        self.nets["classifier"] = net.to(self.device, memory_format=torch.channels_last)

    def classifier_step(self, view: nn.Module, opt: torch.optim.Optimizer) -> Step:
        """BCE on the image labels; `on_cams(raw CAMs, meta)` (OAA) sees each batch's CAMs."""
        device, amp = self.device, self.cfg.amp

        def step(x: torch.Tensor, y: torch.Tensor, meta: BatchMeta) -> dict[str, torch.Tensor]:
            view.train()
            with autocast(device, amp):
                logits, cam = view(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.on_cams(cam.detach(), logits.detach(), y, x.shape[-2:], meta)
            return {"loss": loss.detach()}

        return step

    def on_cams(self, raw: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, size, meta: BatchMeta) -> None:
        """Called with each training batch's raw CAMs and logits (train mode); OAA accumulates them."""

    def on_classifier_epoch(self) -> None:
        """Called after each classifier epoch (before its checkpoint); OAA accumulates validation maps."""

    def phase_cam(self) -> None:
        """Train the CAM classifier for `cam_epochs`; log its validation accuracy."""
        cfg, net = self.cfg, self.nets["classifier"]
        opt = self.resume_optimizer(split_optimizer(net, net.new_parameters(), cfg.lr, cfg.head_lr_scale,
                                                    cfg.weight_decay))
        step = self.classifier_step(self.train_view(net), opt)
        while self.epoch < cfg.cam_epochs:
            t0 = time.perf_counter()
            losses = self.next_epoch(step, f"cam classifier {self.epoch + 1}/{cfg.cam_epochs}")
            self.epoch += 1
            self.on_classifier_epoch()
            acc = self.classifier_accuracy(self.val_arrays)
            self.info(f"cam classifier epoch {self.epoch}/{cfg.cam_epochs}  loss {losses['loss']:.4f}  "
                      f"val accuracy {acc:.3f}")
            self.end_epoch({"phase": "cam", "epoch": self.epoch, **losses, "val_acc": acc}, t0)

    @torch.no_grad()
    def classifier_accuracy(self, arrays: CachedArrays) -> float:
        logits = self.classifier_logits(arrays)
        return float(((logits > 0).numpy() == (np.asarray(arrays.labels) == 1)).mean())

    @torch.no_grad()
    def classifier_logits(self, arrays: CachedArrays) -> torch.Tensor:
        """(N,) float32 CPU logits of a split's whole images: the mean of the logits of each image's tiles
        (one tile, the image itself, when it is input_size square); classifier in eval mode."""
        net = self.nets["classifier"]
        sums = torch.zeros(len(arrays.labels), dtype=torch.float64)
        counts = torch.zeros(len(arrays.labels), dtype=torch.float64)
        with self._eval(net):
            for chunk, x in tile_batches(arrays.images, arrays.sizes, arrays.tile, self.cfg.batch_size * 2):
                index = torch.tensor([i for i, _, _ in chunk])
                sums.index_add_(0, index, self._on_device(lambda t: net(t)[0], x).double())
                counts.index_add_(0, index, torch.ones(len(chunk), dtype=torch.float64))
        return (sums / counts.clamp(min=1)).float()

    @torch.no_grad()
    def cam_maps(self, arrays: CachedArrays) -> torch.Tensor:
        """(N,H,W) float32 CPU normalised CAMs of a split's whole images: the raw CAMs of the tiles,
        upsampled and blended, then per image relu / max over the image (0 on canvas padding)."""
        from ikdmil.engine.evaluate import tiled_maps

        net = self.nets["classifier"]
        with self._eval(net):
            raw = tiled_maps(lambda x: self._on_device(lambda t: F.interpolate(
                net.forward_with_cam(t)[1].float(), size=t.shape[-2:], mode="bilinear", align_corners=False)[:, 0], x),
                arrays.images, arrays.sizes, arrays.tile, self.cfg.batch_size * 2)
        m = torch.from_numpy(raw).clamp(min=0)
        peak = m.amax(dim=(1, 2), keepdim=True)
        return torch.where(peak > 1e-12, m / peak.clamp(min=1e-12), torch.zeros_like(m))

    def _on_device(self, fn, x: torch.Tensor) -> torch.Tensor:
        """`fn` of the uint8 CPU batch x on the run's device (channels_last, autocast), as float32 CPU."""
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.cfg.amp):
            y = fn(x)
        return y.float().cpu()

    @contextlib.contextmanager
    def _eval(self, net: nn.Module):
        was = net.training
        net.eval()
        try:
            yield
        finally:
            net.train(was)

    def make_pseudo_masks(self, train_maps: torch.Tensor, val_maps: torch.Tensor, what: str) -> None:
        """Threshold (chosen on validation) -> `maps["pseudo"]` for the training images, the validation
        pseudo-masks to `pseudo_masks_val.npy`, and the choice in results.json (`pseudo_masks`)."""
        choice = choose_threshold(val_maps, self.val_arrays, train_maps, self.train_arrays.labels,
                                  self.cfg.cam_threshold, use_masks=self.selection == "f1")
        self.maps["pseudo"] = pseudo_masks(train_maps, self.train_arrays.labels, choice["threshold"])[:, None]
        val = pseudo_masks(val_maps, self.val_arrays.labels, choice["threshold"])
        if self.dist.is_main:
            save_array(self.run_dir / "pseudo_masks_val.npy", val.numpy())
        pos = np.asarray(self.train_arrays.labels) == 1
        share = float(self.maps["pseudo"][torch.from_numpy(pos)].float().mean()) if pos.any() else 0.0
        self.extra["pseudo_masks"] = {"from": what, **choice, "train_positive_foreground": round(share, 4)}
        f1 = "-" if choice["val_f1"] is None else f"{choice['val_f1']:.3f}"
        self.info(f"pseudo-masks from {what}: threshold {choice['threshold']:.2f} ({choice['threshold_rule']}), "
                  f"validation F1 {f1}, foreground {share:.1%} of the training positives' pixels")
