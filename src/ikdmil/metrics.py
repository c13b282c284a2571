"""Per-patch evaluation of binary tumour segmentation (numpy / scipy only).

Pipeline: the model's tumour probability map is optionally smoothed with a Gaussian
(:func:`smooth_probability`; the paper's evaluation uses sigma 3, sigma 0 leaves it unchanged),
thresholded by the caller, and the boolean prediction is scored per patch by :func:`patch_scores`.
:func:`summarize` averages a list of per-patch scores.

Rules
-----
* **Positive patch** (label 1): F1 (Dice) and IoU are computed on the foreground (tumour) class,
  prediction ``pred == 1`` against the ground-truth mask ``truth == 1``.
* **Negative patch** (label 0): F1 and IoU are computed on the *background* class. The truth is
  all background, whatever mask (if any) was given; the predicted background is ``pred == 0``.
  With ``N`` pixels of which ``k`` are predicted tumour this gives ``F1 = 2(N-k) / (2N - k)`` and
  ``IoU = (N-k) / N``.
* F1 / IoU when both the prediction and the truth of the scored class are empty: ``(1.0, 1.0)``.
  When exactly one is empty: ``(0.0, 0.0)``.
* **Hausdorff distances** (``hd``, ``hd95``) are computed on positive patches only; negative
  patches get ``None``. Distances are Euclidean, in pixels, between the *boundary* pixels of the
  two foreground masks (the medpy / MONAI surface-distance convention): a boundary pixel is a
  foreground pixel with at least one 4-neighbour that is background or outside the image. For each
  boundary pixel of one mask the distance to the nearest boundary pixel of the other mask is taken
  (exactly, with a Euclidean distance transform); this gives two *directed* distance sets.
  ``hd`` is the largest distance in either set; ``hd95`` is the larger of the two directed 95th
  percentiles (``numpy.percentile``, linear interpolation), so ``hd95 <= hd``.
* Hausdorff edge cases: both masks empty -> ``0.0`` for both; exactly one empty -> the image
  diagonal ``sqrt((H-1)**2 + (W-1)**2)`` for both, i.e. the largest distance two pixels of an
  ``H x W`` image can have (the worst possible score at that resolution).
* :func:`summarize` returns ``n, n_pos, n_neg``; ``f1, iou`` (means over all patches);
  ``f1_pos, iou_pos, f1_neg, iou_neg`` (means over the patches of that label, ``None`` when there
  are none); ``hd, hd95`` (means over positive patches, ``None`` when there are none). All values
  are plain Python ``int`` / ``float`` / ``None`` (JSON-serialisable).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from scipy import ndimage

__all__ = [
    "smooth_probability",
    "binary_f1_iou",
    "hausdorff",
    "patch_scores",
    "summarize",
]


def smooth_probability(prob: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-smooth a probability map before thresholding.

    ``prob`` is ``H x W`` or a batch ``B x H x W`` (each image smoothed on its own; nothing leaks
    across the batch axis). Borders are handled by reflection. ``sigma == 0`` returns an unchanged
    copy. Floating inputs keep their dtype; other inputs are converted to float32.
    """
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    prob = np.asarray(prob)
    if prob.ndim not in (2, 3):
        raise ValueError(f"expected an HxW or BxHxW probability map, got shape {prob.shape}")
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float32)
    if sigma == 0:
        return prob.copy()
    sigmas = (sigma, sigma) if prob.ndim == 2 else (0.0, sigma, sigma)
    return ndimage.gaussian_filter(prob, sigma=sigmas, mode="reflect")


def _as_bool(a: np.ndarray, name: str) -> np.ndarray:
    """Accept bool arrays, or integer arrays holding only 0 and 1; refuse anything ambiguous."""
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"{name} must be boolean or hold only 0 and 1")
        return a.astype(bool)
    raise ValueError(
        f"{name} must be a boolean (or 0/1 integer) mask, got dtype {a.dtype}; threshold it first"
    )


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = _as_bool(pred, "pred")
    truth = _as_bool(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} differs from truth shape {truth.shape}")
    return pred, truth


def binary_f1_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """F1 (Dice) and IoU of two boolean masks of the same shape; both empty -> ``(1.0, 1.0)``."""
    pred, truth = _check_pair(pred, truth)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2.0 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background (or out-of-image) 4-neighbour."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _directed(src_boundary: np.ndarray, dst_boundary: np.ndarray) -> np.ndarray:
    """Distance from every boundary pixel of src to the nearest boundary pixel of dst."""
    # EDT of the complement gives, at every pixel, the distance to the nearest dst-boundary pixel.
    dist = ndimage.distance_transform_edt(~dst_boundary)
    return dist[src_boundary]


def hausdorff(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Symmetric Hausdorff distance and HD95 (pixels) between the boundaries of two masks.

    See the module docstring for the exact definition and the empty-mask conventions.
    """
    pred, truth = _check_pair(pred, truth)
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return 0.0, 0.0
    if has_pred != has_truth:
        diag = math.sqrt(sum((s - 1) ** 2 for s in pred.shape))
        return diag, diag
    bp, bt = _boundary(pred), _boundary(truth)
    d_pt = _directed(bp, bt)
    d_tp = _directed(bt, bp)
    hd = max(float(d_pt.max()), float(d_tp.max()))
    hd95 = max(float(np.percentile(d_pt, 95)), float(np.percentile(d_tp, 95)))
    return hd, hd95


def patch_scores(pred: np.ndarray, truth: np.ndarray | None, label: int) -> dict:
    """Scores of one patch: ``{"f1", "iou", "hd", "hd95", "label"}``.

    ``pred`` is the thresholded boolean prediction (True = tumour). For ``label == 1`` a ``truth``
    mask of the same shape is required; for ``label == 0`` ``truth`` is ignored (the truth is all
    background) and ``hd`` / ``hd95`` are ``None``.
    """
    label = int(label)
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label}")
    pred = _as_bool(pred, "pred")
    if label == 0:
        f1, iou = binary_f1_iou(~pred, np.ones_like(pred))
        return {"f1": f1, "iou": iou, "hd": None, "hd95": None, "label": 0}
    if truth is None:
        raise ValueError("a positive patch (label 1) needs a ground-truth mask")
    pred, truth = _check_pair(pred, truth)
    f1, iou = binary_f1_iou(pred, truth)
    hd, hd95 = hausdorff(pred, truth)
    return {"f1": f1, "iou": iou, "hd": hd, "hd95": hd95, "label": 1}


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def summarize(scores: list[dict]) -> dict:
    """Average per-patch scores (from :func:`patch_scores`); see the module docstring for keys."""
    scores = list(scores)
    pos = [s for s in scores if int(s["label"]) == 1]
    neg = [s for s in scores if int(s["label"]) == 0]
    if len(pos) + len(neg) != len(scores):
        raise ValueError("every score must have label 0 or 1")
    return {
        "n": len(scores),
        "n_pos": len(pos),
        "n_neg": len(neg),
        "f1": _mean(s["f1"] for s in scores),
        "iou": _mean(s["iou"] for s in scores),
        "f1_pos": _mean(s["f1"] for s in pos),
        "iou_pos": _mean(s["iou"] for s in pos),
        "f1_neg": _mean(s["f1"] for s in neg),
        "iou_neg": _mean(s["iou"] for s in neg),
        "hd": _mean(s["hd"] for s in pos),
        "hd95": _mean(s["hd95"] for s in pos),
    }
