"""VGG-MIL: the first three conv blocks of VGG16 with BatchNorm, one side output per block.

Sides are taken from each block's last ReLU, before its max-pool (strides 1, 2, 4), as in HED-style
side supervision. 24.4 GFLOP per 256x256 image forward.
"""

from __future__ import annotations

import torch
from torch import nn

from ikdmil.models.registry import register_backbone

# (out_channels per conv) for VGG16 blocks 1-3: the first seven of VGG16's thirteen convs
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256))


class VGGBlocks(nn.Module):
    def __init__(self, blocks=VGG16_BLOCKS):
        super().__init__()
        layers = []
        c_in = 3
        for convs in blocks:
            mods = []
            for c_out in convs:
                mods += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.Sequential(*mods))
        self.blocks = nn.ModuleList(layers)
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.out_channels = [convs[-1] for convs in blocks]

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]

    def load_convs(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Copy ImageNet conv weights (in VGG16 order) into our convs; returns how many were loaded."""
        convs = self.convs()
        for conv, (w, b) in zip(convs, weights):
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
        return min(len(convs), len(weights))

    def forward(self, x):
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                x = self.pool(x)
            x = block(x)
            feats.append(x)
        return feats


@register_backbone("vgg16")
def vgg16_mil(pretrained: str | None = "imagenet"):
    from ikdmil.models.weights import vgg16_conv_weights

    net = VGGBlocks()
    weights, message = vgg16_conv_weights(pretrained)
    if weights is not None:
        n = net.load_convs(weights)
        message = f"{message} ({n} convs loaded)"
    return net, message
