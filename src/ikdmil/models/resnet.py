"""ResNet-MIL: the stem and stages 1-3 of ResNet-18/34/50, one side output per stage (strides 4/8/16).

Stage 4 (stride 32) is not built: at 256 px it would leave 8x8 maps, too coarse for gland outlines,
and the MIL baselines of the paper's Table 2 stop at stage 3. Module names follow torchvision
(`conv1`, `bn1`, `layer1.0.downsample.0`, ...), which timm's ResNets share, so a torchvision or timm
ImageNet state dict loads by name; its `layer4.*` and `fc.*` tensors are reported as unused.
"""

from __future__ import annotations

from torch import nn

from ikdmil.models.registry import register_backbone


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNetStages(nn.Module):
    """Stem (7x7/2 conv, 3x3/2 max-pool) + stages 1-3; forward returns the three stage outputs."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, int, int]):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        self.out_channels = []
        for i, (width, depth) in enumerate(zip((64, 128, 256), depths)):
            blocks = []
            for j in range(depth):
                blocks.append(block(c_in, width, stride=2 if (i and not j) else 1))
                c_in = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(c_in)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)
            feats.append(x)
        return feats


def _resnet_key(key: str) -> str | None:
    """torchvision and timm share ResNet key names; stage 4 and the classifier are not used."""
    return None if key.startswith(("layer4.", "fc.")) else key


def _register(name: str, block, depths: tuple[int, int, int]) -> None:
    @register_backbone(name, tile_invariant=True)
    def factory(pretrained: str | None = "imagenet"):
        from ikdmil.models.weights import load_renamed_state, read_state_dict, weights_file

        net = ResNetStages(block, depths)
        path, message = weights_file(pretrained, name)
        if path is not None:
            state = read_state_dict(path, name)
            message = load_renamed_state(net, state, path, name, _resnet_key, layout="torchvision/timm keys")
        return net, message

    factory.__doc__ = f"{name} stem + stages 1-3 (side outputs at strides 4/8/16)."


_register("resnet18", BasicBlock, (2, 2, 2))
_register("resnet34", BasicBlock, (3, 4, 6))
_register("resnet50", Bottleneck, (3, 4, 6))
