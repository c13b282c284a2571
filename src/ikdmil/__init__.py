"""ikdmil: weakly-supervised tumour segmentation for H&E histopathology (IKD-MIL)."""

__version__ = "0.1.0"
