"""The segmentation network of the comparison methods: a U-Net-style decoder on any registered backbone.

OEEM, OAA, PistoSeg and `supervised-unet` (see `ikdmil.methods`) all train this one network; only
their targets and losses differ, so Table 1 compares supervision, not architectures.

Architecture: the backbone's side features (one per entry of `out_channels`, any strides) each get
a 1x1 lateral conv to `width` channels. From the deepest up, the running map is bilinearly upsampled
to the next shallower feature's size, concatenated with its lateral and merged by a 3x3 conv + BN +
ReLU (the U-Net skip path); the deepest lateral gets one such block first. A 1x1 conv gives one
logit at the finest side's stride, bilinearly upsampled to the input size; sigmoid. As in
`MILSegmenter`, the input is RGB in [0,1] or uint8 (ImageNet normalisation inside), the backbone and
decoder may run under bf16 autocast, and the last conv, the upsampling and the sigmoid run in float32.

The model contract holds unchanged: `forward` returns `MILOutput(sides=[], fused=prob)` with `prob`
(B,1,H,W) in [0,1], so `evaluate`, `predict` and the metrics take it as they take a MIL model. Model
files record `head: "segnet"` and `decoder_width` (`file_meta`), from which `load_model` rebuilds it.

Where it differs from the papers: OEEM and OAA train DeepLab/PSPNet-style networks on WideResNet-38 /
ResNet-101, PistoSeg a DeepLabV3+, and the supervised reference (CAC-UNet) its own U-Net. Those
encoders need weights we cannot have offline; every row here uses the run's registered backbone
(by default VGG16 blocks 1-3, the IKD teacher's encoder, ImageNet weights from local files) under
this one small decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ikdmil.models.heads import IMAGENET_MEAN, IMAGENET_STD, MILOutput, SideTaps

HEAD = "segnet"


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class SegNet(SideTaps, nn.Module):
    """Backbone + U-Net-style decoder -> one probability map (see the module docstring)."""

    head = HEAD

    def __init__(self, backbone: nn.Module, name: str, width: int = 64):
        super().__init__()
        self.name = name
        self.width = int(width)
        self.backbone = backbone
        chans = list(backbone.out_channels)
        self.lateral = nn.ModuleList(nn.Conv2d(c, self.width, 1) for c in chans)
        self.top = conv_block(self.width, self.width)
        self.merge = nn.ModuleList(conv_block(2 * self.width, self.width) for _ in chans[:-1])
        self.classifier = nn.Conv2d(self.width, 1, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ----------------------------------------------------------------- what model files record
    @property
    def file_meta(self) -> dict:
        """Metadata `save_model` stores so that `load_model` rebuilds this network."""
        return {"head": HEAD, "decoder_width": self.width}

    def new_parameters(self) -> list[nn.Parameter]:
        """The decoder's parameters (randomly initialised, trained at a higher lr than the encoder)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    # ----------------------------------------------------------------- forward
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder features (B, width, h, w) at the finest side's stride (under the caller's autocast)."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = self.backbone(x)
        y = self.top(self.lateral[-1](feats[-1]))
        for i in range(len(feats) - 2, -1, -1):
            lat = self.lateral[i](feats[i])
            y = F.interpolate(y, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            y = self.merge[i](torch.cat([y, lat.to(y.dtype)], dim=1))
        return y

    def logits_from(self, features: torch.Tensor, size) -> torch.Tensor:
        """(B,1,H,W) float32 logits at `size` from decoder features, whatever the autocast."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            logit = self.classifier(features.float())
            return F.interpolate(logit, size=size, mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> tuple[MILOutput, torch.Tensor]:
        """The output and the decoder features (PistoSeg's feature-consistency term reads them)."""
        feats = self.decode(x)
        logit = self.logits_from(feats, x.shape[-2:])
        with torch.autocast(device_type=x.device.type, enabled=False):
            return MILOutput(sides=[], fused=torch.sigmoid(logit)), feats

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """`MILOutput(sides=[], fused=prob)`; with `with_features`, `(output, decoder features)` (through a
        DDP / compiled wrapper too, which is why it is an argument of forward)."""
        out, feats = self.forward_features(x)
        return (out, feats) if with_features else out


def create_segnet(backbone: str, pretrained: str | None = "imagenet", width: int = 64) -> tuple[SegNet, str]:
    """A `SegNet` on the registered `backbone` (weights as `create_model` loads them): (model, message)."""
    from ikdmil.models.registry import create_backbone

    net, message = create_backbone(backbone, pretrained)
    return SegNet(net, backbone, width), message
