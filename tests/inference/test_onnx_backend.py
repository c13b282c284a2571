"""predict's ONNX Runtime backend: chosen by --backend, refused with the fix when it cannot run, and
writing the same maps as PyTorch (run only where onnxruntime is installed: pip install 'ikdmil[onnx]')."""

import json

import numpy as np
import pytest
import tifffile
import torch
from fakes.slides import synth_slide, vgg_model, write_slide

from ikdmil.errors import IkdmilError
from ikdmil.inference import PredictSettings, onnx_backend, predict

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_backend_choice_and_its_errors(monkeypatch):
    monkeypatch.setattr(onnx_backend, "onnxruntime_available", lambda: True)
    assert onnx_backend.resolve_backend("auto", CPU) == "onnxruntime"
    assert onnx_backend.resolve_backend("auto", CUDA) == "torch"  # the GPU runs PyTorch (bf16, cuDNN)
    assert onnx_backend.resolve_backend("torch", CPU) == "torch"
    with pytest.raises(IkdmilError, match="runs on the CPU.*--device cpu or --backend torch"):
        onnx_backend.resolve_backend("onnxruntime", CUDA)
    monkeypatch.setattr(onnx_backend, "onnxruntime_available", lambda: False)
    assert onnx_backend.resolve_backend("auto", CPU) == "torch"
    with pytest.raises(IkdmilError, match=r"not installed; pip install 'ikdmil\[onnx\]'"):
        onnx_backend.resolve_backend("onnxruntime", CPU)


def test_onnxruntime_writes_the_maps_pytorch_writes(tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime not installed (pip install 'ikdmil[onnx]')")
    img, _ = synth_slide(np.random.default_rng(2), 4, 3, 64, tumour={(1, 1), (2, 0)})
    slide = write_slide(tmp_path / "s.tif", img, mpp=0.5, tile=64, levels=1)
    model_file = vgg_model(tmp_path / "vgg.safetensors", input_size=64, gain=30)
    maps = {}
    for backend in ("torch", "onnxruntime"):
        settings = PredictSettings(backend=backend, all_tissue=True, workers=0, device="cpu", batch_size=3)
        rep = predict(model_file, [slide], tmp_path / backend, settings, progress=False, echo=lambda *a: None)
        assert not rep.failures
        assert json.loads((tmp_path / backend / "s" / "summary.json").read_text())["backend"] == backend
        maps[backend] = tifffile.imread(tmp_path / backend / "s" / "probability.tif", key=0).astype(int)
    assert maps["torch"].std() > 5  # the map depends on the image
    assert np.abs(maps["torch"] - maps["onnxruntime"]).max() <= 1  # uint8 rounding of equal float maps
