"""The one place that knows backbone names.

Register a factory with `@register_backbone("name")`; it receives `pretrained` (None, "imagenet",
"none" or a weights file path) and returns `(backbone_module, message)` where the message says what
weights were loaded. `create_model(name, pretrained)` wraps it in a `MILSegmenter`.

`tile_invariant=True` declares a fully convolutional backbone: away from the image border (beyond
its receptive field) its maps do not depend on where an image is cut into tiles, so slide inference
may run it on large tiles (`ikdmil.inference`). Leave it False for backbones with global or
windowed attention (criss-cross attention, Swin windows), which keep the small-tile path.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ikdmil.errors import IkdmilError

_REGISTRY: dict[str, Callable[..., tuple[nn.Module, str]]] = {}
_TILE_INVARIANT: set[str] = set()


def register_backbone(name: str, tile_invariant: bool = False):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        if tile_invariant:
            _TILE_INVARIANT.add(name)
        return fn

    return deco


def is_tile_invariant(name: str) -> bool:
    """Whether backbone `name` was registered as fully convolutional (`tile_invariant=True`)."""
    return name in _TILE_INVARIANT and name in _REGISTRY


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, pretrained: str | None = "imagenet") -> tuple[nn.Module, str]:
    """The registered backbone alone (no heads): `(module, message)`; its forward maps a normalised
    (B,3,H,W) tensor to one feature map per entry of `module.out_channels`. The segmentation network
    and the CAM classifier of the comparison methods (`ikdmil.models.segnet`, `ikdmil.methods.cam`)
    are built on it."""
    if name not in _REGISTRY:
        raise IkdmilError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")
    return _REGISTRY[name](pretrained=pretrained)


def create_model(name: str, pretrained: str | None = "imagenet", verbose: bool = False):
    """Build a registered backbone wrapped in a `MILSegmenter` (side heads + fusion).

    Args:
        name: a registered backbone (`available_backbones()`), e.g. ``"vgg16"`` or ``"resnet18"``.
        pretrained: ``"imagenet"`` (bundled or local weights; nothing is downloaded), ``"none"`` for
            random init, or a path to a weights file in a layout the backbone's family accepts.
        verbose: unused; kept for callers that pass it.

    Returns:
        ``(model, message)``: the model maps ``(B, 3, H, W)`` to a `MILOutput` (side maps and fused map,
        each ``(B, 1, H, W)`` in [0, 1]); the message says which weights were loaded.

    Example:
        >>> model, msg = create_model("vgg16", pretrained="none")
        >>> model(torch.rand(1, 3, 64, 64)).fused.shape
        torch.Size([1, 1, 64, 64])
    """
    from ikdmil.models.heads import MILSegmenter

    backbone, message = create_backbone(name, pretrained)
    return MILSegmenter(backbone, name), message
