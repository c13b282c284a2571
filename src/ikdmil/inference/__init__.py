"""Segmenting slides and patch images with a trained model (`ikdmil predict`).

Modules: `settings` (every option), `tiling` (geometry, blending window, band stitcher, tile
dataset), `model` (loading, the eval-mode forward pass, smoothing), `slide` (one slide's outputs),
`sanity` (per-slide warnings: tumour everywhere, stain far from training), `outputs` (what predict
owns in OUT: folder markers, the lock, the merged index files), `report` (OUT/report.html),
`predict` (the batch driver, its sharing of slides between torchrun ranks, patch images, the
PredictReport).
"""

from ikdmil.inference.model import LoadedModel, fused_forward, gaussian_smooth, load_for_inference
from ikdmil.inference.predict import PredictReport, predict, shard_by_size
from ikdmil.inference.settings import DEFAULT_MODEL_MPP, PredictSettings
from ikdmil.inference.slide import predict_slide
from ikdmil.inference.tiling import BandStitcher, Geometry, blend_window, slide_geometry

__all__ = ["DEFAULT_MODEL_MPP", "BandStitcher", "Geometry", "LoadedModel", "PredictReport", "PredictSettings",
           "blend_window", "fused_forward", "gaussian_smooth", "load_for_inference", "predict", "predict_slide",
           "shard_by_size", "slide_geometry"]
