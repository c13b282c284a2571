"""`supervised-unet`: the fully supervised reference (the ceiling row of Table 1).

The shared U-Net-style `SegNet` (`ikdmil.models.segnet`) on the run's registered encoder, trained
on the training images' *pixel masks* with soft Dice (flipped on negative images, as everywhere in
ikdmil, so an all-background target does not make Dice degenerate) + per-pixel BCE
(`ikdmil.losses.dice_bce_loss`) for `seg_epochs`; the best epoch on validation ->
`segnet.safetensors`. It is the only method that reads training masks (`reads_train_masks`), and it
refuses a training split in which a positive image has no mask.

Named for what it is: the paper's supervised row is CAC-UNet (the GlaS-challenge winner, with its
own encoder, multi-scale training and post-processing), which we do not reproduce; this is a plain
U-Net-style decoder on the same encoder as the other rows (ImageNet weights from local files only).
"""

from __future__ import annotations

import numpy as np

from ikdmil.config import RunConfig
from ikdmil.errors import IkdmilError
from ikdmil.losses import dice_bce_loss
from ikdmil.methods.base import SegRun, mask_tensor
from ikdmil.methods.registry import register_method


class SupervisedRun(SegRun):
    method = "supervised-unet"
    phases = ("segnet",)
    reads_train_masks = True

    def load_data(self) -> None:
        super().load_data()
        labels, has_mask = np.asarray(self.train_arrays.labels), np.asarray(self.train_arrays.has_mask)
        missing = [s for s, lab, hm in zip(self.train_samples, labels, has_mask) if lab == 1 and not hm]
        if missing:
            raise IkdmilError(
                f"{self.cfg.data}: supervised-unet trains on pixel masks, but {len(missing)} training positive(s) "
                f"have none (e.g. {missing[0].image}); add their masks or choose a weakly supervised --method")

    def build(self) -> None:
        self.nets["segnet"] = self.new_segnet(0)

    def phase_segnet(self) -> None:
        targets = mask_tensor(self.train_arrays.masks)
        self.train_segnet("segnet", "segnet", self.cfg.seg_epochs,
                          lambda view, opt: self.seg_step(view, opt, dice_bce_loss, targets), "supervised segnet")


@register_method("supervised-unet", summary="fully supervised reference: U-Net-style decoder on pixel masks "
                                            "(Dice + BCE); the only method that reads training masks")
def train_supervised(cfg: RunConfig, *, resume: bool = False, progress: bool = True, **options) -> dict:
    """The supervised reference into `cfg.out`: writes segnet.safetensors, model.safetensors, results.json."""
    return SupervisedRun(cfg, resume, progress).run()
