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
* ``hd_paper`` (positive patches only) reproduces the IKD-MIL authors' evaluation, which is *not* a
  Hausdorff distance; only it is comparable with the paper's HD column. They take the points of
  ``cv2.findContours(mask, RETR_LIST, CHAIN_APPROX_SIMPLE)`` (every outer and hole border, the
  contours concatenated in OpenCV's order: the reverse of their raster-scan discovery; each border
  traced from its first raster pixel, only its corner points kept), an empty mask replaced by the
  single point (0, 0), and call OpenCV's ``createHausdorffDistanceExtractor().computeDistance``.
  Because of a sort in OpenCV that does nothing (``SORT_EVERY_ROW`` on a one-column matrix), that
  extractor returns, for each direction, the nearest-neighbour distance of the contour point at
  index ``int(0.6 * (n - 1))`` of the first set, and keeps the larger of the two directions. It
  depends on the orientation of the image (rotate both masks and it changes). :func:`contour_points`
  and :func:`hd_paper` re-implement that exactly in numpy (OpenCV is not a dependency).
* ``patch_scores(..., distances=False)`` skips ``hd, hd95, hd_paper`` (``None``), e.g. for
  validation scoring, where only F1 is used.
* :func:`summarize` returns ``n, n_pos, n_neg``; ``f1, iou`` (means over all patches);
  ``f1_pos, iou_pos, f1_neg, iou_neg`` (means over the patches of that label, ``None`` when there
  are none); ``hd, hd95, hd_paper`` (means over the positive patches that have them, ``None`` when
  there are none). All values are plain Python ``int`` / ``float`` / ``None`` (JSON-serialisable).

Image level (model selection without masks): :func:`pooled_score` turns a map into one tumour score
per image, the mean of its top ``top_percent`` % pixels (10 % by default: the max is one pixel and
follows noise, the whole-map mean follows how much of the image is tumour); :func:`image_auc` is the
ROC AUC of those scores, positives against negatives, in its Mann-Whitney U form with average ranks,
so tied scores count one half. It is NaN when either class is missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import ndimage

__all__ = [
    "smooth_probability",
    "binary_f1_iou",
    "hausdorff",
    "contour_points",
    "hd_paper",
    "patch_scores",
    "summarize",
    "pooled_score",
    "image_auc",
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


# ---------------------------------------------------------------- the authors' "Hausdorff" (OpenCV)

# OpenCV chain-code directions 0..7: E, NE, N, NW, W, SW, S, SE (x right, y down)
_DX = (1, 1, 0, -1, -1, -1, 0, 1)
_DY = (0, -1, -1, -1, 0, 1, 1, 1)
_RIGHT = -126  # OpenCV's mark of a traced pixel whose east neighbour is background (schar 2 | 0x80)
_RANK = float(np.float32(0.6))  # the extractor's default rank proportion, a C float widened to double


def _trace(img: list[int], width: int, i0: int, x: int, y: int, hole: bool) -> list[tuple[int, int]]:
    """One border from flat index i0 (point x, y), as OpenCV's icvFetchContourEx with
    CHAIN_APPROX_SIMPLE: Suzuki-Abe following, a point kept where the chain direction changes."""
    deltas = [_DX[s] + _DY[s] * width for s in range(8)]
    s = s_end = 0 if hole else 4
    while True:  # clockwise search for the last pixel of the border
        s = (s - 1) & 7
        i1 = i0 + deltas[s]
        if img[i1] != 0 or s == s_end:
            break
    if s == s_end:  # a single-pixel component
        img[i0] = _RIGHT
        return [(x, y)]
    points, i3, prev_s = [], i0, s ^ 4
    while True:
        s_end = s
        while True:  # counter-clockwise search for the next border pixel
            s += 1
            i4 = i3 + deltas[s & 7]
            if img[i4] != 0:
                break
        s &= 7
        if 1 <= s <= s_end:  # the east neighbour was examined and is background
            img[i3] = _RIGHT
        elif img[i3] == 1:
            img[i3] = 2
        if s != prev_s:
            points.append((x, y))
            prev_s = s
        x, y = x + _DX[s], y + _DY[s]
        if i4 == i0 and i3 == i1:
            return points
        i3 = i4
        s = (s + 4) & 7


def contour_points(mask: np.ndarray) -> np.ndarray:
    """The (x, y) points of ``cv2.findContours(mask, RETR_LIST, CHAIN_APPROX_SIMPLE)``, every
    contour concatenated in OpenCV's order, as an (n, 2) int array; an empty mask gives [[0, 0]].

    The image is framed by background (OpenCV pads by one pixel) and scanned in raster order; a
    border starts at a 0 -> 1 step (outer) or at a 1 -> 0 step whose left pixel is not marked as a
    traced right end (hole). Only steps between background and foreground can start one, so those
    are found with numpy and only the borders are followed in Python.
    """
    m = _as_bool(mask, "mask")
    if m.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {m.shape}")
    h, w = m.shape
    padded = np.zeros((h + 2, w + 2), np.int8)
    padded[1:-1, 1:-1] = m
    img = padded.ravel().tolist()
    width = w + 2
    steps = m != np.pad(m, ((0, 0), (1, 0)))[:, :-1]  # differs from its left neighbour
    contours = []
    for r, c in zip(*np.nonzero(steps)):
        y, x = int(r) + 1, int(c) + 1  # padded coordinates
        i = y * width + x
        prev, p = img[i - 1], img[i]
        if prev == 0 and p == 1:
            contours.append(_trace(img, width, i, x - 1, y - 1, hole=False))
        elif p == 0 and prev >= 1:
            contours.append(_trace(img, width, i - 1, x - 2, y - 1, hole=True))
    contours.reverse()  # each new contour is prepended to its parent's list
    points = [pt for contour in contours for pt in contour]
    return np.asarray(points or [(0, 0)], dtype=np.int64).reshape(-1, 2)


def _ranked_nearest(a: np.ndarray, b: np.ndarray) -> np.float32:
    """OpenCV's directed term: the float32 nearest distance in b of a's point int(0.6 (n - 1))."""
    k = int(_RANK * (len(a) - 1))
    d = (b - a[k]).astype(np.float64)
    return np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2).astype(np.float32).min()


def hd_paper(pred: np.ndarray, truth: np.ndarray) -> float:
    """The authors' HD (see the module docstring): OpenCV's Hausdorff extractor on the contour
    points of both masks. In pixels; not a Hausdorff distance; orientation-dependent."""
    pred, truth = _check_pair(pred, truth)
    a, b = contour_points(pred), contour_points(truth)
    return float(max(_ranked_nearest(a, b), _ranked_nearest(b, a)))


# ---------------------------------------------------------------- per patch, summary


def patch_scores(pred: np.ndarray, truth: np.ndarray | None, label: int, distances: bool = True) -> dict:
    """Scores of one patch: ``{"f1", "iou", "hd", "hd95", "hd_paper", "label"}``.

    ``pred`` is the thresholded boolean prediction (True = tumour). For ``label == 1`` a ``truth``
    mask of the same shape is required; for ``label == 0`` ``truth`` is ignored (the truth is all
    background) and the distances are ``None``; ``distances=False`` skips them on positives too.
    """
    label = int(label)
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label}")
    pred = _as_bool(pred, "pred")
    if label == 0:
        f1, iou = binary_f1_iou(~pred, np.ones_like(pred))
        return {"f1": f1, "iou": iou, "hd": None, "hd95": None, "hd_paper": None, "label": 0}
    if truth is None:
        raise ValueError("a positive patch (label 1) needs a ground-truth mask")
    pred, truth = _check_pair(pred, truth)
    f1, iou = binary_f1_iou(pred, truth)
    if not distances:
        return {"f1": f1, "iou": iou, "hd": None, "hd95": None, "hd_paper": None, "label": 1}
    hd, hd95 = hausdorff(pred, truth)
    return {"f1": f1, "iou": iou, "hd": hd, "hd95": hd95, "hd_paper": hd_paper(pred, truth), "label": 1}


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
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
        "hd_paper": _mean(s.get("hd_paper") for s in pos),
    }


def pooled_score(prob: np.ndarray, top_percent: float) -> float:
    """Image-level tumour score of a map: the mean of its highest `top_percent` % values (at least one)."""
    values = np.asarray(prob, np.float64).ravel()
    if values.size == 0 or not 0 < top_percent <= 100:
        raise ValueError(f"need a non-empty map and 0 < top_percent <= 100, got {values.size} px, {top_percent}")
    k = max(1, int(math.ceil(values.size * top_percent / 100)))
    return float(np.partition(values, values.size - k)[values.size - k:].mean())


def image_auc(scores: Iterable[float], labels: Iterable[int]) -> float:
    """ROC AUC of `scores` for labels 1 vs 0: P(score of a positive > score of a negative), ties 1/2.

    Mann-Whitney U from average ranks (scipy's `rankdata`), exact with ties; NaN without both classes."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(list(scores), np.float64), np.asarray(list(labels))
    if scores.shape != labels.shape or not np.isin(labels, (0, 1)).all() or not np.isfinite(scores).all():
        raise ValueError("image_auc needs one finite score and one label (0 or 1) per image")
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = rankdata(scores)[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))
