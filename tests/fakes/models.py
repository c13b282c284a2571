"""A tiny backbone: two conv stages with side features at strides 1 and 2 (any number of sides and
strides work). It is the README's "your own backbone" example, and a fast backbone for training tests."""

from torch import nn


class TinyNet(nn.Module):
    out_channels = [8, 16]

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):  # x: ImageNet-normalised (B, 3, H, W)
        f1 = self.stage1(x)
        return [f1, self.stage2(f1)]
