"""The one place that knows backbone names.

Register a factory with `@register_backbone("name")`; it receives `pretrained` (None, "imagenet",
"none" or a weights file path) and returns `(backbone_module, message)` where the message says what
weights were loaded. `create_model(name, pretrained)` wraps it in a `MILSegmenter`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ikdmil.errors import IkdmilError

_REGISTRY: dict[str, Callable[..., tuple[nn.Module, str]]] = {}


def register_backbone(name: str):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, pretrained: str | None = "imagenet", verbose: bool = False):
    """Build a MILSegmenter; returns (model, message about the weights)."""
    from ikdmil.models.heads import MILSegmenter

    if name not in _REGISTRY:
        raise IkdmilError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}")
    backbone, message = _REGISTRY[name](pretrained=pretrained)
    return MILSegmenter(backbone, name), message
