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

from typing import Callable

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


def create_model(name: str, pretrained: str | None = "imagenet", verbose: bool = False):
    """Build a MILSegmenter; returns (model, message about the weights)."""
    from ikdmil.models.heads import MILSegmenter

    if name not in _REGISTRY:
        raise IkdmilError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")
    backbone, message = _REGISTRY[name](pretrained=pretrained)
    return MILSegmenter(backbone, name), message
