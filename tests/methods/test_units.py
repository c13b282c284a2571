"""The comparison methods' mechanisms, each on hand-built inputs: CAMs, thresholds, OEEM weights, OAA
accumulation, mosaics, feature consistency, and the shared segmentation network (registry-parametrised)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ikdmil.data.dataset import CachedArrays
from ikdmil.engine.loop import dihedral
from ikdmil.errors import IkdmilError
from ikdmil.losses import PROB_CLAMP, easy_example_weights, pixel_bce, weighted_ce
from ikdmil.methods.cam import CAMClassifier, choose_threshold, normalise_cam, otsu_threshold, pseudo_masks
from ikdmil.methods.oaa import MaxAccumulator, with_fallback
from ikdmil.methods.oeem import oeem_loss
from ikdmil.methods.pistoseg import cell_edges, feature_consistency, make_mosaic
from ikdmil.models import available_backbones
from ikdmil.models.checkpoint import load_model, save_model
from ikdmil.models.segnet import SegNet, create_segnet


# ------------------------------------------------------------------ CAM
class FixedFeatures(nn.Module):
    """A 'backbone' whose deepest feature map is a given tensor (whatever the input)."""

    out_channels = [2]

    def __init__(self, feats: torch.Tensor):
        super().__init__()
        self.feats = feats

    def forward(self, x):
        return [self.feats]


def test_cam_values_on_a_hand_built_classifier():
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0] = torch.tensor([[4.0, 1.0], [0.0, 0.0]])
    f[0, 1] = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    net = CAMClassifier(FixedFeatures(f), "fixed")
    with torch.no_grad():
        net.fc.weight.copy_(torch.tensor([[1.0, -1.0]]))
        net.fc.bias.fill_(0.3)
    logits, raw = net(torch.zeros(1, 3, 2, 2))
    expected = torch.tensor([[4.0, 1.0], [-1.0, -2.0]])  # w . f per location, no bias
    assert torch.allclose(raw[0, 0], expected)
    assert torch.allclose(logits, torch.tensor([expected.mean() + 0.3]))  # GAP then linear
    cams = net.cams(torch.zeros(1, 3, 2, 2))  # same size: no resampling
    assert torch.allclose(cams[0, 0], torch.tensor([[1.0, 0.25], [0.0, 0.0]]))  # relu / max


def test_normalised_cams_are_in_0_1_with_a_peak_of_1_or_all_zero():
    raw = torch.randn(3, 1, 4, 4)
    raw[2] = -raw[2].abs() - 0.1  # no positive activation at all
    cams = normalise_cam(raw, (16, 16))
    assert cams.shape == (3, 1, 16, 16) and cams.min() >= 0 and cams.max() <= 1
    assert torch.allclose(cams[:2].amax(dim=(1, 2, 3)), torch.ones(2))
    assert cams[2].abs().sum() == 0


def _arrays(masks: np.ndarray, labels, has_mask=None) -> CachedArrays:
    n = len(labels)
    return CachedArrays(images=np.zeros((n, *masks.shape[1:], 3), np.uint8), masks=masks,
                        labels=np.asarray(labels), has_mask=np.ones(n, bool) if has_mask is None else has_mask)


def test_threshold_is_chosen_on_validation_masks_else_otsu():
    truth = np.zeros((2, 8, 8), bool)
    truth[0, :, :4] = True  # left half tumour
    maps = torch.zeros(2, 8, 8)
    maps[0, :, :4] = 0.62  # the tumour half; only thresholds <= 0.6 recover it
    maps[0, :, 4:] = 0.2  # the rest; thresholds <= 0.2 take it too
    maps[1] = 0.9  # a negative: gated away whatever its map
    val = _arrays(truth, [1, 0])
    choice = choose_threshold(maps, val, maps, [1, 0])
    assert choice["threshold"] == 0.25 and choice["val_f1"] == pytest.approx(1.0)
    assert choice["threshold_rule"] == "best validation F1"
    fixed = choose_threshold(maps, val, maps, [1, 0], fixed=0.7)
    assert fixed["threshold"] == 0.7 and fixed["val_f1"] == pytest.approx(0.5)  # positive missed, negative right
    no_masks = _arrays(truth, [1, 0], has_mask=np.array([False, True]))
    fallback = choose_threshold(maps, no_masks, maps, [1, 0])
    assert fallback["val_f1"] is None and "Otsu" in fallback["threshold_rule"]
    assert 0.2 <= fallback["threshold"] < 0.62  # separates the two levels of the positive's map
    assert pseudo_masks(maps, [1, 0], 0.25).tolist() == [truth[0].tolist(), np.zeros((8, 8), bool).tolist()]
    label_only = choose_threshold(maps, val, maps, [1, 0], use_masks=False)  # --selection auc: masks unused
    assert label_only["threshold"] == fallback["threshold"] and "label-only" in label_only["threshold_rule"]
    assert label_only["val_f1"] is not None  # still reported


def test_otsu_separates_two_modes():
    values = np.concatenate([np.full(100, 0.1), np.full(50, 0.8)])
    assert 0.1 < otsu_threshold(values) <= 0.8


# ------------------------------------------------------------------ OEEM
def test_oeem_weights_are_the_normalised_softmax_of_minus_the_loss():
    torch.manual_seed(0)
    pred = torch.rand(3, 1, 5, 5, requires_grad=True)
    target = (torch.rand(3, 1, 5, 5) > 0.5).float()
    loss = pixel_bce(pred, target)
    w = easy_example_weights(loss)
    manual = torch.exp(-loss.detach()) / torch.exp(-loss.detach()).sum(1, keepdim=True)
    assert torch.allclose(w, manual) and torch.allclose(w.sum(1), torch.ones(3))
    assert not w.requires_grad
    value = oeem_loss(pred, target)
    assert torch.allclose(value, (manual * loss).sum(1).mean())
    assert torch.allclose(value, weighted_ce(pred, target))  # one mechanism, shared with IKD's L_wce
    value.backward()  # the weights are constants: the gradient is sum_j w_j dl_j
    p = pred.detach().clamp(PROB_CLAMP, 1 - PROB_CLAMP).flatten(1)
    dl = (p - target.flatten(1)) / (p * (1 - p))
    assert torch.allclose(pred.grad.flatten(1), manual * dl / 3, atol=1e-6)


# ------------------------------------------------------------------ OAA
def test_oaa_accumulation_is_the_elementwise_max_across_epochs_in_canonical_orientation():
    torch.manual_seed(1)
    n, s = 5, 6
    acc = MaxAccumulator(n, s)
    seen = []
    for _epoch in range(3):
        canonical = torch.rand(n, 1, s, s)
        seen.append(canonical[:, 0])
        ops = torch.randint(0, 8, (n,))
        order = torch.randperm(n)
        for batch in (order[:3], order[3:]):  # the network sees augmented views, in shuffled batches
            acc.update(batch, dihedral(canonical[batch], ops[batch]), ops[batch])
        assert torch.allclose(acc.maps, torch.stack(seen).amax(0))
    before = acc.maps.clone()
    acc.update(torch.tensor([0, 1]), torch.ones(2, 1, s, s), keep=torch.tensor([False, True]))
    assert torch.equal(acc.maps[0], before[0]) and torch.equal(acc.maps[1], torch.ones(s, s))
    empty = torch.zeros(2, s, s)
    empty[1] = 0.5
    cams = torch.full((2, s, s), 0.3)
    assert torch.equal(with_fallback(empty, cams), torch.stack([cams[0], empty[1]]))


# ------------------------------------------------------------------ PistoSeg
@pytest.mark.parametrize("size, grid", [(32, 2), (30, 4), (17, 3)])
def test_mosaic_masks_are_exact(size, grid):
    gen = torch.Generator().manual_seed(size + grid)
    rng = np.random.default_rng(0)
    neg = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    pos = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2)]
    seen = set()
    for _ in range(6):
        image, mask, layout = make_mosaic(neg, pos, grid, size, gen)
        assert image.shape == (size, size, 3) and mask.shape == (size, size) and mask.dtype == bool
        cover = np.zeros((size, size), int)
        for r0, r1, c0, c1, label, src, y, x in layout:
            cover[r0:r1, c0:c1] += 1
            assert (mask[r0:r1, c0:c1] == bool(label)).all()  # exactly the class of the cell's source
            source = (pos if label else neg)[src]
            assert np.array_equal(image[r0:r1, c0:c1], source[y:y + r1 - r0, x:x + c1 - c0])
            seen.add(label)
        assert (cover == 1).all()  # the cells tile the mosaic
    assert seen == {0, 1}
    assert cell_edges(size, grid)[0] == 0 and cell_edges(size, grid)[-1] == size


def test_mosaic_positive_crops_follow_the_cam_and_one_class_pools_work():
    size = 16
    pos = [np.full((size, size, 3), 200, np.uint8)]
    cam = np.zeros((size, size), np.float32)
    cam[8:, 8:] = 1.0  # the tumour-like corner
    gen = torch.Generator().manual_seed(0)
    means = []
    for _ in range(20):
        _, mask, layout = make_mosaic([], pos, 2, size, gen, pos_maps=[cam])
        assert mask.all()  # only positives: every cell is tumour
        means += [cam[y:y + 8, x:x + 8].mean() for *_, y, x in layout]
    random_mean = np.mean([cam[y:y + 8, x:x + 8].mean() for y in range(9) for x in range(9)])
    assert np.mean(means) > random_mean + 0.1
    _, mask, _ = make_mosaic([pos[0]], [], 2, size, gen)
    assert not mask.any()
    with pytest.raises(ValueError, match="at least one"):
        make_mosaic([], [], 2, size, gen)


def test_feature_consistency_is_zero_for_equivariant_features_and_positive_otherwise():
    f = torch.randn(4, 8, 5, 5)
    ops = torch.tensor([0, 1, 5, 7])
    assert feature_consistency(f, dihedral(f, ops), ops) < 1e-5
    assert feature_consistency(f, torch.randn(4, 8, 5, 5), ops) > 0.5


# ------------------------------------------------------------------ the shared segmentation network
@pytest.mark.parametrize("name", available_backbones())
def test_segnet_on_every_backbone_maps_images_to_probabilities_and_reloads(name, tmp_path):
    torch.manual_seed(0)
    net, _ = create_segnet(name, pretrained="none", width=16)
    net.eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        out = net(x)
    assert out.sides == [] and out.fused.shape == (2, 1, 64, 64) and out.fused.dtype == torch.float32
    assert 0 <= out.fused.min() and out.fused.max() <= 1
    if name not in ("vgg16", "resnet18"):  # the round trip is backbone-independent; building is the slow part
        return
    path = save_model(net, tmp_path / "m.safetensors", input_size=64, method="oeem", role="segnet")
    loaded, meta = load_model(path)
    assert isinstance(loaded, SegNet) and meta["head"] == "segnet" and meta["decoder_width"] == 16
    assert meta["method"] == "oeem"
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x).fused, out.fused)


def test_model_files_name_their_head_and_unknown_heads_fail_in_one_line(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    net, _ = create_segnet("vgg16", pretrained="none", width=8)
    path = save_model(net, tmp_path / "m.safetensors")
    state = load_file(str(path))
    for head, width, needle in (("unet++", 8, "'unet\\+\\+' network"), ("segnet", "x", "decoder_width")):
        bad = tmp_path / f"{head}.safetensors"
        meta = {"format": "ikdmil-model-1", "backbone": "vgg16", "head": head, "decoder_width": width}
        save_file(state, str(bad), metadata={"ikdmil": json.dumps(meta)})
        with pytest.raises(IkdmilError, match=needle):
            load_model(bad)
