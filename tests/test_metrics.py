"""Metrics on hand-made masks; every expected value is worked out by hand in the comments."""

import math

import numpy as np
import pytest

from ikdmil.metrics import (
    binary_f1_iou,
    contour_points,
    hausdorff,
    hd_paper,
    image_auc,
    patch_scores,
    pooled_score,
    smooth_probability,
    summarize,
)


def _square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


# ---------------------------------------------------------------- F1 / IoU


def test_f1_iou_partial_overlap():
    # truth rows 2-5 x cols 2-5 (16 px), pred rows 2-5 x cols 4-7 (16 px); overlap cols 4-5 = 8 px.
    # tp=8 fp=8 fn=8 -> F1 = 16/32 = 0.5, IoU = 8/24 = 1/3
    truth = _square((10, 10), 2, 6, 2, 6)
    pred = _square((10, 10), 2, 6, 4, 8)
    f1, iou = binary_f1_iou(pred, truth)
    assert f1 == pytest.approx(0.5)
    assert iou == pytest.approx(1 / 3)


def test_f1_iou_subset():
    # pred 2x2 inside truth 4x2: tp=4 fp=0 fn=4 -> F1 = 8/12, IoU = 4/8
    truth = _square((6, 6), 0, 4, 0, 2)
    pred = _square((6, 6), 0, 2, 0, 2)
    f1, iou = binary_f1_iou(pred, truth)
    assert f1 == pytest.approx(2 / 3)
    assert iou == pytest.approx(0.5)


def test_f1_iou_perfect_and_disjoint():
    a = _square((5, 5), 1, 3, 1, 3)
    assert binary_f1_iou(a, a) == (1.0, 1.0)
    b = _square((5, 5), 4, 5, 4, 5)
    assert binary_f1_iou(a, b) == (0.0, 0.0)


def test_f1_iou_empty_prediction():
    truth = _square((5, 5), 0, 2, 0, 2)
    assert binary_f1_iou(np.zeros((5, 5), bool), truth) == (0.0, 0.0)


def test_f1_iou_empty_truth():
    pred = _square((5, 5), 0, 2, 0, 2)
    assert binary_f1_iou(pred, np.zeros((5, 5), bool)) == (0.0, 0.0)


def test_f1_iou_both_empty():
    z = np.zeros((5, 5), bool)
    assert binary_f1_iou(z, z) == (1.0, 1.0)


def test_f1_iou_accepts_01_ints_and_rejects_probabilities():
    truth = _square((4, 4), 0, 2, 0, 2)
    assert binary_f1_iou(truth.astype(np.uint8), truth) == (1.0, 1.0)
    with pytest.raises(ValueError):
        binary_f1_iou(truth.astype(np.float32) * 0.7, truth)
    with pytest.raises(ValueError):
        binary_f1_iou(truth.astype(np.uint8) * 255, truth)
    with pytest.raises(ValueError):
        binary_f1_iou(truth, truth[:3])


# ---------------------------------------------------------------- Hausdorff


def test_hausdorff_two_single_points():
    # (0,0) vs (3,4): distance sqrt(9+16) = 5 in both directions
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[0, 0] = True
    b[3, 4] = True
    assert hausdorff(a, b) == (pytest.approx(5.0), pytest.approx(5.0))


def test_hausdorff_two_small_squares():
    # 2x2 squares at cols 0-1 and cols 5-6 (rows 0-1); every pixel is a boundary pixel.
    # a->b: (r,0) -> 5, (r,1) -> 4; max 5. Symmetric. Sorted directed [4,4,5,5]: p95 at index
    # 0.95*3 = 2.85 -> 5.
    a = _square((4, 8), 0, 2, 0, 2)
    b = _square((4, 8), 0, 2, 5, 7)
    hd, hd95 = hausdorff(a, b)
    assert hd == pytest.approx(5.0)
    assert hd95 == pytest.approx(5.0)


def test_hausdorff_overlapping_squares():
    # truth ring: rows 2,5 cols 2-5 and (3,2),(4,2),(3,5),(4,5); pred ring shifted 2 columns.
    # truth->pred distances: col-2 pixels 2 (x4), (2,3),(5,3),(3,5),(4,5) 1, (2,4),(2,5),(5,4),(5,5) 0
    # -> max 2, p95 of sorted [0,0,0,0,1,1,1,1,2,2,2,2] at index 10.45 -> 2. Symmetric for pred.
    truth = _square((10, 10), 2, 6, 2, 6)
    pred = _square((10, 10), 2, 6, 4, 8)
    hd, hd95 = hausdorff(pred, truth)
    assert hd == pytest.approx(2.0)
    assert hd95 == pytest.approx(2.0)


def test_hd95_differs_from_hd_with_one_outlier():
    # truth: row 0, cols 0-39 (40 px). pred: row 1, cols 0-39 plus an outlier at (21, 0).
    # pred->truth: 40 distances of 1 and the outlier's 21 (nearest truth pixel (0,0)).
    # 41 values, p95 at index 0.95*40 = 38 -> 1. truth->pred: all 1.  HD = 21, HD95 = 1.
    truth = np.zeros((30, 40), bool)
    truth[0, :] = True
    pred = np.zeros((30, 40), bool)
    pred[1, :] = True
    pred[21, 0] = True
    hd, hd95 = hausdorff(pred, truth)
    assert hd == pytest.approx(21.0)
    assert hd95 == pytest.approx(1.0)
    assert hausdorff(truth, pred) == (pytest.approx(21.0), pytest.approx(1.0))  # symmetric


def test_hausdorff_identical_is_zero():
    a = _square((9, 9), 2, 7, 1, 5)
    assert hausdorff(a, a) == (0.0, 0.0)


def test_hausdorff_empty_conventions():
    z = np.zeros((10, 10), bool)
    a = _square((10, 10), 3, 5, 3, 5)
    diag = math.sqrt(9**2 + 9**2)  # pixel (0,0) to pixel (9,9)
    assert hausdorff(z, z) == (0.0, 0.0)
    assert hausdorff(z, a) == (pytest.approx(diag), pytest.approx(diag))  # empty prediction
    assert hausdorff(a, z) == (pytest.approx(diag), pytest.approx(diag))  # empty truth


def test_hausdorff_uses_exact_euclidean_distances():
    # (0,0) vs (1,1): sqrt(2), not 1 (chessboard) or 2 (taxicab)
    a = np.zeros((3, 3), bool)
    b = np.zeros((3, 3), bool)
    a[0, 0] = True
    b[1, 1] = True
    assert hausdorff(a, b)[0] == pytest.approx(math.sqrt(2))


# ---------------------------------------------------------------- the authors' OpenCV "Hausdorff"
# Points are (x, y). Expected contours follow OpenCV's Suzuki-Abe tracing by hand: an outer border
# starts at its first raster pixel and runs down its left side first (a filled rectangle gives
# top-left, bottom-left, bottom-right, top-right); CHAIN_APPROX_SIMPLE keeps the corners; contours
# come in reverse order of discovery.


def test_contour_of_a_filled_square():
    m = _square((5, 5), 1, 4, 1, 4)
    assert contour_points(m).tolist() == [[1, 1], [1, 3], [3, 3], [3, 1]]


def test_contours_of_a_ring_come_hole_first():
    # 5x5 square with its centre (3,3) cleared: the hole border, the 4 pixels around the centre, is
    # found after the outer one (row 3 vs row 1) and so comes first; it starts left of the hole at
    # (2,3) and runs (3,2), (4,3), (3,4).
    m = _square((7, 7), 1, 6, 1, 6)
    m[3, 3] = False
    assert contour_points(m).tolist() == [[2, 3], [3, 2], [4, 3], [3, 4], [1, 1], [1, 5], [5, 5], [5, 1]]


def test_contours_of_a_line_and_a_pixel_and_of_nothing():
    m = np.zeros((6, 6), bool)
    m[1, 1] = True  # found first (row 1), listed last
    m[4, 2:5] = True  # a horizontal line: its two end points
    assert contour_points(m).tolist() == [[2, 4], [4, 4], [1, 1]]
    assert contour_points(np.zeros((4, 4), bool)).tolist() == [[0, 0]]  # empty -> the point (0, 0)
    assert contour_points(np.eye(4, dtype=bool)).tolist() == [[0, 0], [3, 3]]
    assert contour_points(np.ones((3, 4), bool)).tolist() == [[0, 0], [0, 2], [3, 2], [3, 0]]


def test_hd_paper_takes_the_point_at_rank_0_6_not_the_maximum():
    # pred: one pixel (1,1). truth: square x,y 1..3, points (1,1),(1,3),(3,3),(3,1).
    # pred->truth: n = 1, index 0: (1,1) -> 0. truth->pred: n = 4, index int(0.6 * 3) = 1: (1,3) -> 2.
    # So 2, while the Hausdorff distance is 2*sqrt(2) (the corner (3,3)).
    pred = np.zeros((6, 6), bool)
    pred[1, 1] = True
    truth = _square((6, 6), 1, 4, 1, 4)
    assert hd_paper(pred, truth) == 2.0
    assert hausdorff(pred, truth)[0] == pytest.approx(2 * math.sqrt(2))


def test_hd_paper_depends_on_the_orientation():
    # a: x 1..3, y 1..3 -> (1,1),(1,3),(3,3),(3,1); b: x 1..8, y 1..3 -> (1,1),(1,3),(8,3),(8,1).
    # index 1 of each is (1,3), a point of the other: 0. Rotated by 180 degrees (x, y -> 9 - x, 9 - y):
    # a' corners (6,6),(6,8),(8,8),(8,6), b' (1,6),(1,8),(8,8),(8,6); a'[1] = (6,8) -> (8,8): 2;
    # b'[1] = (1,8) -> (6,8): 5. The Hausdorff distance is 5 both ways.
    a = _square((10, 10), 1, 4, 1, 4)
    b = _square((10, 10), 1, 4, 1, 9)
    assert hd_paper(a, b) == 0.0
    assert hd_paper(a[::-1, ::-1], b[::-1, ::-1]) == 5.0
    assert hausdorff(a, b)[0] == hausdorff(a[::-1, ::-1], b[::-1, ::-1])[0] == pytest.approx(5.0)


def test_hd_paper_empty_masks_use_the_point_0_0():
    # empty pred -> (0,0). pred->truth: (0,0) -> (1,1): sqrt 2. truth->pred: index 1 (1,3) -> sqrt 10.
    z = np.zeros((6, 6), bool)
    truth = _square((6, 6), 1, 4, 1, 4)
    assert hd_paper(z, truth) == pytest.approx(math.sqrt(10), rel=1e-7)
    assert hd_paper(z, z) == 0.0


def test_patch_scores_report_hd_paper_beside_hd():
    truth = _square((10, 10), 2, 6, 2, 6)
    pred = _square((10, 10), 2, 6, 4, 8)
    s = patch_scores(pred, truth, 1)
    # pred (4,2),(4,5),(7,5),(7,2), truth (2,2),(2,5),(5,5),(5,2): index 1 -> (4,5) vs (5,5): 1, (2,5) vs (4,5): 2
    assert s["hd_paper"] == 2.0 and s["hd"] == pytest.approx(2.0)
    assert patch_scores(pred, None, 0)["hd_paper"] is None
    fast = patch_scores(pred, truth, 1, distances=False)
    assert fast["f1"] == s["f1"] and fast["hd"] is None and fast["hd_paper"] is None


# ---------------------------------------------------------------- smoothing


def test_smoothing_sigma_zero_is_identity():
    rng = np.random.default_rng(0)
    p = rng.random((7, 9)).astype(np.float32)
    out = smooth_probability(p, 0)
    assert out.dtype == p.dtype
    assert np.array_equal(out, p)
    assert out is not p


def test_smoothing_removes_isolated_speck_but_keeps_blob():
    p = np.zeros((41, 41), np.float32)
    p[5, 5] = 1.0  # isolated one-pixel speck
    p[15:35, 15:35] = 1.0  # 20x20 tumour blob
    assert (p > 0.5)[5, 5]
    m = smooth_probability(p, 3) > 0.5
    assert not m[0:11, 0:11].any()  # speck gone (peak ~ 1 / (2 pi 9) ~ 0.018)
    assert m[25, 25]  # blob centre survives


def test_smoothing_batch_is_per_image():
    rng = np.random.default_rng(1)
    batch = rng.random((3, 16, 16))
    out = smooth_probability(batch, 2.0)
    assert out.shape == batch.shape
    for i in range(3):
        np.testing.assert_allclose(out[i], smooth_probability(batch[i], 2.0))


def test_smoothing_rejects_bad_input():
    with pytest.raises(ValueError):
        smooth_probability(np.zeros((4, 4)), -1)
    with pytest.raises(ValueError):
        smooth_probability(np.zeros(4), 1)


# ---------------------------------------------------------------- patch scores / summary


def test_patch_scores_positive():
    truth = _square((10, 10), 2, 6, 2, 6)
    pred = _square((10, 10), 2, 6, 4, 8)
    s = patch_scores(pred, truth, 1)
    assert s["label"] == 1
    assert s["f1"] == pytest.approx(0.5)
    assert s["iou"] == pytest.approx(1 / 3)
    assert s["hd"] == pytest.approx(2.0)
    assert s["hd95"] == pytest.approx(2.0)


def test_patch_scores_positive_empty_prediction():
    truth = _square((10, 10), 2, 6, 2, 6)
    s = patch_scores(np.zeros((10, 10), bool), truth, 1)
    assert (s["f1"], s["iou"]) == (0.0, 0.0)
    assert s["hd"] == pytest.approx(9 * math.sqrt(2))
    assert s["hd95"] == pytest.approx(9 * math.sqrt(2))


def test_patch_scores_negative_with_false_positives():
    # 10x10 = 100 px, 5 predicted tumour. Background class: tp = 95, fn = 5, fp = 0.
    # F1 = 2*95 / (2*95 + 5) = 190/195 = 38/39; IoU = 95/100.
    pred = np.zeros((10, 10), bool)
    pred[0, :5] = True
    s = patch_scores(pred, None, 0)
    assert s["f1"] == pytest.approx(38 / 39)
    assert s["iou"] == pytest.approx(0.95)
    assert s["hd"] is None and s["hd95"] is None
    assert s["label"] == 0


def test_patch_scores_negative_ignores_given_mask():
    pred = np.zeros((10, 10), bool)
    pred[0, :5] = True
    bogus = np.ones((10, 10), bool)
    assert patch_scores(pred, bogus, 0) == patch_scores(pred, None, 0)


def test_patch_scores_negative_clean_and_all_tumour():
    assert patch_scores(np.zeros((4, 4), bool), None, 0)["f1"] == 1.0
    s = patch_scores(np.ones((4, 4), bool), None, 0)
    assert (s["f1"], s["iou"]) == (0.0, 0.0)


def test_patch_scores_argument_errors():
    with pytest.raises(ValueError):
        patch_scores(np.zeros((4, 4), bool), None, 1)
    with pytest.raises(ValueError):
        patch_scores(np.zeros((4, 4), bool), None, 2)


def test_summarize_mixed_list():
    scores = [
        {"f1": 0.5, "iou": 1 / 3, "hd": 2.0, "hd95": 2.0, "hd_paper": 1.0, "label": 1},
        {"f1": 1.0, "iou": 1.0, "hd": 0.0, "hd95": 0.0, "hd_paper": 0.0, "label": 1},
        {"f1": 38 / 39, "iou": 0.95, "hd": None, "hd95": None, "hd_paper": None, "label": 0},
    ]
    s = summarize(scores)
    assert (s["n"], s["n_pos"], s["n_neg"]) == (3, 2, 1)
    assert s["f1"] == pytest.approx((0.5 + 1.0 + 38 / 39) / 3)
    assert s["iou"] == pytest.approx((1 / 3 + 1.0 + 0.95) / 3)
    assert s["f1_pos"] == pytest.approx(0.75)
    assert s["iou_pos"] == pytest.approx((1 / 3 + 1.0) / 2)
    assert s["f1_neg"] == pytest.approx(38 / 39)
    assert s["iou_neg"] == pytest.approx(0.95)
    assert s["hd"] == pytest.approx(1.0)
    assert s["hd95"] == pytest.approx(1.0)
    assert s["hd_paper"] == pytest.approx(0.5)
    assert all(isinstance(v, (int, float)) for v in s.values())


def test_summarize_absent_classes():
    only_neg = summarize([{"f1": 1.0, "iou": 1.0, "hd": None, "hd95": None, "label": 0}])
    assert only_neg["f1_pos"] is None and only_neg["iou_pos"] is None
    assert only_neg["hd"] is None and only_neg["hd95"] is None
    assert only_neg["f1_neg"] == 1.0
    only_pos = summarize([{"f1": 0.5, "iou": 0.25, "hd": 3.0, "hd95": 2.0, "label": 1}])
    assert only_pos["f1_neg"] is None and only_pos["iou_neg"] is None
    empty = summarize([])
    assert empty["n"] == 0 and empty["f1"] is None and empty["hd"] is None


# ---------------------------------------------------------------- image level (selection without masks)
def test_image_auc_perfect_inverted_and_ties():
    labels = [1, 1, 0, 0]
    assert image_auc([0.9, 0.8, 0.2, 0.1], labels) == 1.0
    assert image_auc([0.1, 0.2, 0.8, 0.9], labels) == 0.0
    assert image_auc([0.5, 0.5, 0.5, 0.5], labels) == 0.5  # every pair tied: 4 halves of 4 pairs
    # pairs (pos, neg): (0.7, 0.7) tie = 1/2, (0.7, 0.1) = 1, (0.3, 0.7) = 0, (0.3, 0.1) = 1 -> 2.5 / 4
    assert image_auc([0.7, 0.3, 0.7, 0.1], labels) == pytest.approx(0.625)


def test_image_auc_matches_the_pair_count_on_random_scores():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 40) / 4, rng.integers(0, 2, 40)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert image_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_image_auc_of_one_class_is_nan_and_bad_input_is_refused():
    assert math.isnan(image_auc([0.2, 0.9], [1, 1]))
    assert math.isnan(image_auc([0.2], [0]))
    with pytest.raises(ValueError, match="one finite score and one label"):
        image_auc([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="one finite score and one label"):
        image_auc([0.1, float("nan")], [1, 0])


def test_pooled_score_is_the_mean_of_the_top_percent():
    prob = np.zeros((10, 10))
    prob[0, :5] = 1.0  # 5 % of the pixels
    assert pooled_score(prob, 5) == 1.0
    assert pooled_score(prob, 10) == 0.5  # top 10 px: five ones, five zeros
    assert pooled_score(prob, 100) == pytest.approx(0.05)
    assert pooled_score(prob, 0.01) == 1.0  # at least one pixel: the max
    with pytest.raises(ValueError):
        pooled_score(prob, 0)
