"""OAA (Jiang et al., ICCV 2019, "Integral Object Mining via Online Attention Accumulation").

While the CAM classifier trains, each training image's attention map is accumulated across epochs by
element-wise maximum: `A_i <- max(A_i, CAM_i)`, where `CAM_i` is the normalised CAM
(`ikdmil.methods.cam.normalise_cam`) from the very forward pass that trains on the image. The image
reaches the network as a random crop, flipped / rotated by the run's augmentation, so its CAM
(normalised over the crop) is first mapped back to the image's canonical orientation
(`dihedral_inverse` of the batch's op) and the maximum is taken in the image's frame, at the crop's
place (`MaxAccumulator`). As the classifier shifts its attention from one
discriminative region to another over training, the maximum collects them all: the "integral
object". The accumulated maps are thresholded (on validation, see `ikdmil.methods.cam`) into the
pseudo-masks of the training images, and the shared `SegNet` is trained on them with per-pixel BCE
for `seg_epochs` (best epoch on validation -> `segnet.safetensors`).

Phases: `cam` (classifier + accumulation), `pseudo`, `segnet`.

Where we differ from the paper, and why:
- The validation images never pass through training, so there is no training-time CAM to
  accumulate for them; to choose the threshold on maps of the same kind, their CAMs are taken (eval
  mode) after every classifier epoch and accumulated by the same maximum. No validation label or
  mask reaches the classifier.
- OAA+ adds an integral-attention-learning branch trained on the accumulated maps, and OAA's
  segmentation network is DeepLab on ResNet-101 with CRF post-processing; we keep the accumulation
  (the method's core), drop the extra branch and the CRF, and train the shared `SegNet` on the
  run's registered backbone (ImageNet weights from local files only; see `ikdmil.models.segnet`).
- One class (tumour) and BCE instead of the paper's multi-class softmax; maps are accumulated for
  every image and the pseudo-masks of negative images are empty (their label rules tumour out).
- An image's CAM enters the maximum only when the classifier currently predicts the image's label
  correctly, so the untrained network's first, near-random maps are not kept forever by the
  maximum (OAA accumulates from the start); an image never classified correctly gets the final
  classifier's CAM.
- Under torchrun each rank accumulates the images of its shard; the ranks' maps are combined by an
  all-reduce maximum after every epoch.

The training maps are accumulated on the device when they fit (`fits_on_device`), so a training
step never waits for the GPU; in host memory otherwise (one device-to-host copy per step).
"""

from __future__ import annotations

import torch

from ikdmil.config import RunConfig
from ikdmil.engine.loop import BatchMeta, dihedral_inverse
from ikdmil.methods.cam import CamRun, normalise_cam
from ikdmil.methods.registry import register_method


class MaxAccumulator:
    """Element-wise maximum of each image's maps over epochs, in the image's canonical orientation.

    `maps` is (N,H,W) float32 on the CPU (the split's canvas; `size` an int for square S x S), zeros at
    the start (CAMs are >= 0). A training batch holds crops: each crop's map goes to its place (a host
    copy per step, kept for now: the crop offsets are per row).
    """

    def __init__(self, n: int, size: int | tuple[int, int], maps: torch.Tensor | None = None):
        h, w = (size, size) if isinstance(size, int) else size
        self.maps = maps if maps is not None else torch.zeros(n, h, w)

    def load(self, maps: torch.Tensor) -> None:
        """Continue from `maps` (e.g. a checkpoint's copy)."""
        self.maps = maps.cpu()

    def update(self, index: torch.Tensor, cams: torch.Tensor, ops: torch.Tensor | None = None,
               keep: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> None:
        """Fold in (B,1,s,s) CAMs of dataset rows `index`, seen under dihedral `ops` (None: unaugmented)
        at canvas origins `offsets` (B,2) (None: whole maps); `keep` (B,) bool: only those rows (None: all)."""
        if ops is not None:
            cams = dihedral_inverse(cams, ops)
        idx, cams = index.cpu().long(), cams[:, 0].float().cpu()
        if offsets is None:
            offsets = torch.zeros(len(idx), 2, dtype=torch.long)
        if keep is not None:
            keep = keep.cpu().bool()
            idx, cams, offsets = idx[keep], cams[keep], offsets[keep]
        s0, s1 = cams.shape[-2:]
        for i, cam, (y, x) in zip(idx.tolist(), cams, offsets.tolist()):
            self.maps[i, y:y + s0, x:x + s1] = torch.maximum(self.maps[i, y:y + s0, x:x + s1], cam)

    def all_reduce(self, device: torch.device) -> None:
        """Combine the ranks' maps (each rank saw its own shard) by their maximum."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = self.maps.to(device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            self.maps = t.to(self.maps.device)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the classifier currently predicts the image's label (logit > 0 <=> tumour)."""
    return (logits.detach().float() > 0) == (labels.to(logits.device) == 1)


def with_fallback(accumulated: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """The accumulated maps; an image whose map stayed empty (never classified correctly) gets `cams`'."""
    empty = accumulated.flatten(1).amax(1) <= 0
    return torch.where(empty.view(-1, 1, 1), cams, accumulated)


class OAARun(CamRun):
    method = "oaa"
    phases = ("cam", "pseudo", "segnet")

    def build(self) -> None:
        self.build_classifier()
        self.nets["segnet"] = self.new_segnet(1)
        self.acc_train = MaxAccumulator(len(self.train_arrays.labels), self.train_arrays.images.shape[1:3])
        self.acc_val = MaxAccumulator(len(self.val_arrays.labels), self.val_arrays.images.shape[1:3])

    def _restore(self) -> None:
        super()._restore()
        if "oaa_train" in self.maps:  # the accumulators continue from the checkpoint
            self.acc_train.load(self.maps["oaa_train"])
            self.acc_val.load(self.maps["oaa_val"])

    def on_cams(self, raw: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, size, meta: BatchMeta) -> None:
        self.acc_train.update(meta.index, normalise_cam(raw, size), meta.ops, keep=correct(logits, labels),
                              offsets=meta.offsets)

    def on_classifier_epoch(self) -> None:
        self.acc_train.all_reduce(self.device)
        val, labels = self.cam_maps(self.val_arrays), torch.as_tensor(self.val_arrays.labels)
        keep = correct(self.classifier_logits(self.val_arrays), labels)
        self.acc_val.update(torch.arange(len(val)), val[:, None], keep=keep)
        self.maps["oaa_train"], self.maps["oaa_val"] = self.acc_train.maps.cpu(), self.acc_val.maps  # CPU

    def phase_pseudo(self) -> None:
        train = with_fallback(self.acc_train.maps, self.cam_maps(self.train_arrays))
        val = with_fallback(self.acc_val.maps, self.cam_maps(self.val_arrays))
        self.make_pseudo_masks(train, val, "accumulated attention (OAA)")



@register_method("oaa", summary="CAMs accumulated over classifier epochs (max) -> pseudo-masks -> segmentation network")
def train_oaa(cfg: RunConfig, *, resume: bool = False, progress: bool = True, **options) -> dict:
    """OAA into `cfg.out`: writes segnet.safetensors, model.safetensors and results.json."""
    return OAARun(cfg, resume, progress).run()
