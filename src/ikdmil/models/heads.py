"""The model contract shared by every backbone: side maps + fused map.

A backbone is any `nn.Module` with a class attribute/property `out_channels` (one entry per side
output) whose forward maps a normalised (B,3,H,W) tensor to a list of feature maps, one per side, at
any stride. `MILSegmenter` adds the rest of the method: ImageNet normalisation, a 1x1 conv side head
per feature map, bilinear upsampling to the input size, sigmoid, and the learnable fusion
`f_w = sum_i w_i f_i` with `w = softmax(fusion_logits)` (non-negative, sums to one, so the fused map
stays a probability). Losses, engine, metrics and inference only ever see `MILOutput`.

Precision: the backbone may run under bf16 autocast, but the side heads, the upsampling, the
sigmoid and the fusion always run in float32 (autocast is switched off around them), so every map
is a float32 probability in [0, 1]. In bf16 a fused map reached 1.0078 and sigmoid(7) rounded to
exactly 1, which stopped the gradient of the weighted cross-entropy.

Side taps: a backbone may expose `side_taps` (where its side outputs are taken, see
`models/vgg.py`) and `align_corners` (how its side logits are upsampled); the model file records
`side_taps` so that `load_model` rebuilds the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class MILOutput:
    """Side maps and fused map, each (B,1,H,W) probabilities at the input size."""

    sides: list[torch.Tensor]
    fused: torch.Tensor

    def all_maps(self) -> list[torch.Tensor]:
        return [*self.sides, self.fused]


class SideTaps:
    """For a network over `self.backbone` (named `self.name`): where the backbone's side outputs are taken."""

    @property
    def side_taps(self) -> str | None:
        """"pre-pool" / "post-pool" for the VGG family, None when the backbone's sides are fixed."""
        return getattr(self.backbone, "side_taps", None)

    def set_side_taps(self, taps: str) -> None:
        """Choose the side taps of a backbone that offers them (parameter-free: weights still fit)."""
        if self.side_taps is None:
            raise ValueError(f"backbone {self.name!r} has fixed side outputs; it has no side taps to choose")
        self.backbone.set_side_taps(taps)


class MILSegmenter(SideTaps, nn.Module):
    """Backbone + side heads + weighted fusion; input is RGB in [0,1] (float) or uint8."""

    def __init__(self, backbone: nn.Module, name: str):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.side_heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1) for c in backbone.out_channels)
        self.fusion_logits = nn.Parameter(torch.zeros(len(backbone.out_channels)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def fusion_weights(self) -> torch.Tensor:
        return torch.softmax(self.fusion_logits, dim=0)

    def side_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Side logits upsampled to the input size (before the sigmoid), float32 whatever the autocast."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        size = x.shape[-2:]
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.backbone(x)
        align = bool(getattr(self.backbone, "align_corners", False))
        with torch.autocast(device_type=x.device.type, enabled=False):
            return [
                F.interpolate(head(f.float()), size=size, mode="bilinear", align_corners=align)
                for head, f in zip(self.side_heads, feats)
            ]

    def fuse(self, sides: list[torch.Tensor]) -> torch.Tensor:
        """f_w = sum_i w_i f_i in float32, clamped to <= 1 (float32 weights can sum to 1 + 1e-7)."""
        w = self.fusion_weights.float()
        return sum(wi * s.float() for wi, s in zip(w, sides)).clamp(max=1.0)

    def forward(self, x: torch.Tensor) -> MILOutput:
        logits = self.side_logits(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            sides = [torch.sigmoid(s) for s in logits]
            return MILOutput(sides=sides, fused=self.fuse(sides))
