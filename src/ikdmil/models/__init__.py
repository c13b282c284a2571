"""Backbones with side outputs and a fused map, created by name through the registry."""

from ikdmil.models.heads import MILOutput, MILSegmenter
from ikdmil.models.registry import available_backbones, create_model, register_backbone

__all__ = ["MILOutput", "MILSegmenter", "available_backbones", "create_model", "register_backbone"]

# importing the family modules registers their backbones
from ikdmil.models import resnet, sa_mil, swin, vgg  # noqa: E402,F401
