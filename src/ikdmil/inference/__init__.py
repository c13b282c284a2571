"""Segmenting slides and patch images with a trained model (`ikdmil predict`)."""

from ikdmil.inference.predict import BandStitcher, blend_window, gaussian_smooth, predict, slide_geometry
from ikdmil.inference.settings import DEFAULT_MODEL_MPP, PredictSettings

__all__ = ["DEFAULT_MODEL_MPP", "BandStitcher", "PredictSettings", "blend_window", "gaussian_smooth", "predict",
           "slide_geometry"]
