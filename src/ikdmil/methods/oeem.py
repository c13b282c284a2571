"""OEEM (Li et al., MICCAI 2022, "Online Easy Example Mining for weakly-supervised gland segmentation").

Phases: `cam` (the CAM classifier, `ikdmil.methods.cam`), `pseudo` (normalised CAMs of the training
and validation images, the threshold chosen on validation, pseudo-masks), `segnet` (the shared
`SegNet` trained on the training images' pseudo-masks for `seg_epochs`, best epoch on validation ->
`segnet.safetensors`).

The loss is OEEM's online easy-example mining: the per-pixel cross-entropy against the pseudo-mask,
each pixel weighted, within its image, by the normalised softmax of minus its loss,
`w_j = exp(-l_j) / sum_k exp(-l_k)` (no gradient through the weights), so pixels the network already
agrees with count more and the pseudo-masks' noise is not amplified. It is the mechanism IKD borrows
as L_wce, and the code is the same: `ikdmil.losses.weighted_ce` (= `easy_weighted(pixel_bce(...))`).

Where we differ from the paper, and why:
- Networks: OEEM's classifier is a WideResNet-38 and its segmentation network a PSPNet on
  WideResNet-38, both from ImageNet weights we cannot have offline; ours are the run's registered
  backbone (VGG16 blocks 1-3 with local ImageNet weights by default) under global pooling + linear,
  and the shared U-Net-style `SegNet`.
- Two classes, one logit: OEEM's softmax CE over gland / background is, for two classes, the binary
  CE of one sigmoid output, which is what we train.
- OEEM crops patches from the (large) GlaS images at several scales and uses test-time multi-scale
  inference; we train and predict at the run's `input_size` like every other row.
- The CAM threshold is chosen on validation masks (OEEM fixed it), see `ikdmil.methods.cam`.
"""

from __future__ import annotations

from ikdmil.config import RunConfig
from ikdmil.losses import weighted_ce
from ikdmil.methods.cam import CamRun
from ikdmil.methods.registry import register_method


def oeem_loss(pred, target, labels=None):
    """OEEM's loss: CE against the pseudo-mask, pixels weighted by softmax(-CE) over the image."""
    return weighted_ce(pred, target)


class OEEMRun(CamRun):
    method = "oeem"
    phases = ("cam", "pseudo", "segnet")
    seg_loss = staticmethod(oeem_loss)

    def build(self) -> None:
        self.build_classifier()
        self.nets["segnet"] = self.new_segnet(1)

    def phase_pseudo(self) -> None:
        self.make_pseudo_masks(self.cam_maps(self.train_arrays), self.cam_maps(self.val_arrays),
                               "CAM")



@register_method("oeem", summary="CAM pseudo-masks -> segmentation network with online easy-example mining")
def train_oeem(cfg: RunConfig, *, resume: bool = False, progress: bool = True, **options) -> dict:
    """OEEM into `cfg.out`: writes segnet.safetensors, model.safetensors and results.json."""
    return OEEMRun(cfg, resume, progress).run()
