"""The inference model wrapper: map smoothing on the device equals evaluation's (scipy) smoothing."""

import numpy as np
import pytest


@pytest.mark.parametrize("sigma", [0.0, 1.5, 3.0])
def test_tile_smoothing_on_the_device_equals_evaluation_smoothing(sigma):
    import torch

    from ikdmil.inference import gaussian_smooth
    from ikdmil.metrics import smooth_probability

    x = np.random.default_rng(6).random((3, 40, 56)).astype(np.float32)
    ours = gaussian_smooth(torch.from_numpy(x), sigma).numpy()
    assert np.abs(ours - smooth_probability(x, sigma)).max() < 1e-5


def test_the_convolution_smoothing_path_used_on_gpus_matches_scipy():
    import torch

    from ikdmil.inference import gaussian_smooth
    from ikdmil.metrics import smooth_probability

    x = np.random.default_rng(7).random((2, 48, 40)).astype(np.float32)
    for sigma in (1.0, 3.0):
        ours = gaussian_smooth(torch.from_numpy(x), sigma, conv=True).numpy()
        assert np.abs(ours - smooth_probability(x, sigma)).max() < 1e-5
    tiny = x[:, :5, :6]  # smaller than the kernel
    assert np.abs(gaussian_smooth(torch.from_numpy(tiny), 3.0, conv=True).numpy()
                  - smooth_probability(tiny, 3.0)).max() < 1e-5


def test_torch_smoothing_agrees_with_evaluation_smoothing_at_sigma_3_on_tile_maps():
    """The torch path (the one slide inference takes on a GPU) against `metrics.smooth_probability` (scipy),
    at the default `--sigma 3`, on maps like a model's: tile-sized, sharp-edged, saturated near 0 and 1."""
    import torch

    from ikdmil.inference import gaussian_smooth
    from ikdmil.metrics import smooth_probability

    rng = np.random.default_rng(8)
    maps = np.zeros((4, 64, 96), np.float32)
    maps[0, 10:40, 20:70] = 1.0  # a block with sharp edges, touching nothing
    maps[1, :, :30] = 1.0  # a block touching the border (the reflect padding matters)
    maps[2] = rng.random((64, 96)) > 0.7  # salt
    maps[3] = 1 / (1 + np.exp(-rng.normal(0, 4, (64, 96))))  # saturated logits
    ours = gaussian_smooth(torch.from_numpy(maps), 3.0, conv=True)
    assert ours.dtype == torch.float32 and ours.shape == maps.shape
    assert np.abs(ours.numpy() - smooth_probability(maps, 3.0)).max() < 1e-5
    assert np.array_equal(gaussian_smooth(torch.from_numpy(maps), 3.0).numpy(), smooth_probability(maps, 3.0))


def test_inference_and_evaluation_share_one_forward_pass(tmp_path):
    """`LoadedModel.fused` (predict, torch backend) and `engine.evaluate.predict_fused` (evaluate) give the same
    maps (the ONNX Runtime backend is compared in test_onnx_backend.py)."""
    import torch
    from fakes.slides import vgg_model

    from ikdmil.engine.evaluate import predict_fused
    from ikdmil.inference import PredictSettings, load_for_inference

    lm = load_for_inference(vgg_model(tmp_path / "v.safetensors", input_size=32), PredictSettings(device="cpu",
                                                                                               backend="torch"))
    images = np.random.default_rng(9).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ours = lm.fused(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert ours.shape == (3, 32, 32) and ours.std() > 0
    lm.model.train()  # evaluation puts the model in eval mode for the pass and restores the mode after
    theirs = predict_fused(lm.model, images, lm.device, batch_size=3)  # same batch: same kernels
    assert lm.model.training
    assert np.array_equal(ours, theirs)
