"""Evaluation on a split: fused probability maps -> optional smoothing -> threshold -> per-patch scores.

Every image is scored whole at the model's scale: its map is stitched from overlapping tiles of the
model's input size (`tiled_maps`) over the image's rescaled (h, w), and smoothing, thresholding, F1,
IoU and the Hausdorff distances see exactly that grid (masks rescaled to it by nearest neighbour, see
`ikdmil.data.dataset`), so distances are isotropic and in model px. Canvas padding is never scored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ikdmil.data.dataset import CachedArrays
from ikdmil.data.scale import spread_starts
from ikdmil.io import write_png
from ikdmil.metrics import image_auc, patch_scores, pooled_score, smooth_probability, summarize
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


def image_tiles(sizes: np.ndarray, tile: int) -> list[tuple[int, int, int]]:
    """(image, y, x) of the `tile` windows covering each image's (h, w), overlapping by at least a
    quarter (as `predict`'s default tiles), in image order."""
    step = max(1, tile - tile // 4)
    return [(i, y, x) for i, (h, w) in enumerate(np.asarray(sizes))
            for y in spread_starts(int(h), tile, step) for x in spread_starts(int(w), tile, step)]


def tile_batches(images: np.ndarray, sizes: np.ndarray, tile: int, batch_size: int, progress: bool = False,
                 desc: str = "predicting"):
    """Yield (tiles [(image, y, x)], uint8 (b,3,tile,tile) CPU tensor) over the windows of `image_tiles`."""
    tiles = image_tiles(sizes, tile)
    for start in tqdm(range(0, len(tiles), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = tiles[start:start + batch_size]
        x = np.stack([images[i, y:y + tile, x:x + tile] for i, y, x in chunk])
        yield chunk, torch.from_numpy(x).permute(0, 3, 1, 2)


def tiled_maps(fn, images: np.ndarray, sizes: np.ndarray, tile: int, batch_size: int = 32, progress: bool = False,
               desc: str = "predicting") -> np.ndarray:
    """(N,H,W) float32 map of each whole image from `fn` (uint8 (b,3,t,t) -> (b,t,t) maps) on its tiles,
    blended by `blend_window` over the overlaps (an image of one tile keeps its map exactly); 0 outside
    each image's (h, w)."""
    from ikdmil.inference.tiling import blend_window

    n, height, width = images.shape[:3]
    out = np.zeros((n, height, width), np.float32)
    remaining = np.bincount([i for i, _, _ in image_tiles(sizes, tile)], minlength=n)
    single = remaining == 1
    window = blend_window(tile, tile // 4)
    weight: dict[int, np.ndarray] = {}
    for chunk, x in tile_batches(images, sizes, tile, batch_size, progress, desc):
        maps = fn(x).float().cpu().numpy()
        for (i, y, x0), m in zip(chunk, maps):
            if single[i]:
                out[i, y:y + tile, x0:x0 + tile] = m
                continue
            w = weight.setdefault(i, np.zeros((height, width), np.float32))
            out[i, y:y + tile, x0:x0 + tile] += m * window
            w[y:y + tile, x0:x0 + tile] += window
            remaining[i] -= 1
            if remaining[i] == 0:  # the image's last tile: normalise by the weights
                out[i] /= np.maximum(weight.pop(i), 1e-12)
    for i, (h, w) in enumerate(np.asarray(sizes)):
        out[i, h:], out[i, :, w:] = 0, 0
    return out


def predict_fused(model, images, device: torch.device, batch_size: int = 32, amp: bool = True,
                  progress: bool = False, desc: str = "predicting") -> np.ndarray:
    """Fused tumour probability (N,H,W) float32 of each whole image, tiled at the model's input size.

    `images`: a split's `CachedArrays` (its sizes and tile), or uint8 (N,H,W,3) images taken whole,
    tiled at their short side."""
    arrays = images if isinstance(images, CachedArrays) else CachedArrays(images, None, None, None)
    was_training = model.training
    model.eval()

    def fused(x: torch.Tensor) -> torch.Tensor:
        from ikdmil.inference.model import fused_forward

        return fused_forward(model, x, device, amp)[:, 0]

    try:
        return tiled_maps(fused, arrays.images, arrays.sizes, arrays.tile, batch_size, progress, desc)
    finally:
        model.train(was_training)


def score_predictions(probs: np.ndarray, arrays: CachedArrays, sigma: float, threshold: float,
                      distances: bool = True) -> tuple[dict, list[dict]]:
    """Per-patch scores and their summary. Positives without a mask get no pixel score;
    `distances=False` skips the Hausdorff distances (validation only needs F1)."""
    scores = []
    for i, prob in enumerate(probs):
        if not arrays.has_mask[i]:
            continue
        pred = smooth_probability(arrays.valid(i, prob), sigma) >= threshold  # the whole image, no padding
        label = int(arrays.labels[i])
        truth = np.asarray(arrays.valid(i, arrays.masks[i])) if label == 1 else None
        s = patch_scores(pred, truth, label, distances)
        s["index"] = i
        scores.append(s)
    summary = summarize(scores) if scores else {"n": 0}
    return summary, scores


def image_auc_of(probs: np.ndarray, arrays: CachedArrays, sigma: float, top_percent: float) -> float:
    """ROC AUC (positive vs negative images) of each whole image's `pooled_score` of its smoothed map:
    the label-only validation criterion (`ikdmil.engine.run`); NaN unless both classes are present."""
    scores = [pooled_score(smooth_probability(arrays.valid(i, p), sigma), top_percent) for i, p in enumerate(probs)]
    return image_auc(scores, np.asarray(arrays.labels))


def evaluate_model(model: torch.nn.Module, arrays: CachedArrays, device: torch.device, sigma: float,
                   threshold: float, batch_size: int = 32, amp: bool = True, progress: bool = False,
                   desc: str = "evaluating", distances: bool = True) -> tuple[dict, list[dict], np.ndarray]:
    """(summary, per-patch scores, fused probabilities) of `model` on a split."""
    probs = predict_fused(model, arrays, device, batch_size, amp, progress, desc)
    summary, scores = score_predictions(probs, arrays, sigma, threshold, distances)
    return summary, scores, probs


def write_overlays(folder: Path, names: list[str], arrays: CachedArrays, probs: np.ndarray, sigma: float,
                   threshold: float, limit: int | None = None) -> int:
    """PNG per image: H&E with prediction (green) and truth (blue) outlines | thresholded mask."""
    count = 0
    for i, name in enumerate(names):
        if limit is not None and count >= limit:
            break
        img = np.asarray(arrays.valid(i, arrays.images[i]))
        pred = smooth_probability(arrays.valid(i, probs[i]), sigma) >= threshold
        truth = np.asarray(arrays.valid(i, arrays.masks[i])) if arrays.has_mask[i] else None
        mask_rgb = np.repeat((pred.astype(np.uint8) * 255)[..., None], 3, -1)
        write_png(folder / f"{name}.png", side_by_side(overlay(img, pred, truth), mask_rgb))
        count += 1
    return count
