"""Evaluation on a split: fused probability maps -> optional smoothing -> threshold -> per-patch scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ikdmil.data.dataset import CachedArrays
from ikdmil.io import write_png
from ikdmil.metrics import patch_scores, smooth_probability, summarize
from ikdmil.visualize import overlay, side_by_side


@torch.no_grad()
def iter_fused(model, images: np.ndarray, device: torch.device, batch_size: int = 32, amp: bool = True,
               progress: bool = False, desc: str = "predicting"):
    """Yield (start, fused (b,1,S,S) tensor on `device`) over uint8 (N,S,S,3) images, model in eval mode."""
    from ikdmil.inference.model import fused_forward

    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
            x = torch.from_numpy(np.array(images[start:start + batch_size])).permute(0, 3, 1, 2)
            yield start, fused_forward(model, x, device, amp)
    finally:
        model.train(was_training)


def predict_fused(model, images: np.ndarray, device: torch.device, batch_size: int = 32, amp: bool = True,
                  progress: bool = False, desc: str = "predicting") -> np.ndarray:
    """Fused tumour probability (N,S,S) float32 for uint8 (N,S,S,3) images."""
    out = np.empty(images.shape[:3], np.float32)
    for start, fused in iter_fused(model, images, device, batch_size, amp, progress, desc):
        out[start:start + len(fused)] = fused[:, 0].float().cpu().numpy()
    return out


def score_predictions(probs: np.ndarray, arrays: CachedArrays, sigma: float, threshold: float,
                      distances: bool = True) -> tuple[dict, list[dict]]:
    """Per-patch scores and their summary. Positives without a mask get no pixel score;
    `distances=False` skips the Hausdorff distances (validation only needs F1)."""
    scores = []
    for i, prob in enumerate(probs):
        if not arrays.has_mask[i]:
            continue
        pred = smooth_probability(prob, sigma) >= threshold
        label = int(arrays.labels[i])
        truth = np.asarray(arrays.masks[i]) if label == 1 else None
        s = patch_scores(pred, truth, label, distances)
        s["index"] = i
        scores.append(s)
    summary = summarize(scores) if scores else {"n": 0}
    return summary, scores


def evaluate_model(model: torch.nn.Module, arrays: CachedArrays, device: torch.device, sigma: float,
                   threshold: float, batch_size: int = 32, amp: bool = True, progress: bool = False,
                   desc: str = "evaluating", distances: bool = True) -> tuple[dict, list[dict], np.ndarray]:
    """(summary, per-patch scores, fused probabilities) of `model` on a split."""
    probs = predict_fused(model, arrays.images, device, batch_size, amp, progress, desc)
    summary, scores = score_predictions(probs, arrays, sigma, threshold, distances)
    return summary, scores, probs


def write_overlays(folder: Path, names: list[str], arrays: CachedArrays, probs: np.ndarray, sigma: float,
                   threshold: float, limit: int | None = None) -> int:
    """PNG per image: H&E with prediction (green) and truth (blue) outlines | thresholded mask."""
    count = 0
    for i, name in enumerate(names):
        if limit is not None and count >= limit:
            break
        img = np.asarray(arrays.images[i])
        pred = smooth_probability(probs[i], sigma) >= threshold
        truth = np.asarray(arrays.masks[i]) if arrays.has_mask[i] else None
        mask_rgb = np.repeat((pred.astype(np.uint8) * 255)[..., None], 3, -1)
        write_png(folder / f"{name}.png", side_by_side(overlay(img, pred, truth), mask_rgb))
        count += 1
    return count
