"""A trained model ready for inference: loading, the eval-mode forward pass, and map smoothing.

`fused_forward` is the one eval-mode forward path of the project: evaluation
(`ikdmil.engine.evaluate.iter_fused`) and slide/patch inference (`LoadedModel.fused`) both call it,
so a model is run the same way wherever its maps are scored or written. Inputs are uint8 RGB
batches (B,3,H,W) (the model normalises them itself); they are moved to the device in channels-last
memory format and run under `ikdmil.device.autocast` (bf16 on CUDA when `amp`, fp32 on CPU).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ikdmil.device import autocast
from ikdmil.inference.settings import DEFAULT_MODEL_MPP, PredictSettings

logger = logging.getLogger(__name__)


@torch.no_grad()
def fused_forward(model: torch.nn.Module, x: torch.Tensor, device: torch.device, amp: bool = True) -> torch.Tensor:
    """The fused map (B,1,H,W) of a uint8 (B,3,H,W) batch, on `device` in the autocast dtype.

    The caller puts the model in eval mode (`load_for_inference` does; `iter_fused` does and restores).

    Example:
        >>> fused = fused_forward(model, torch.zeros(2, 3, 64, 64, dtype=torch.uint8), torch.device("cpu"))
        >>> fused.shape
        torch.Size([2, 1, 64, 64])
    """
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast(device, amp):
        return model(x).fused


@dataclass
class LoadedModel:
    """A model in eval mode on its device, with what inference needs to know about it."""

    model: torch.nn.Module
    meta: dict
    path: Path
    device: torch.device
    input_size: int
    mpp: float
    mpp_source: str
    amp: bool
    batch_size: int

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """(B,H,W) float32 fused probability on the device for a uint8 (B,3,H,W) batch."""
        return fused_forward(self.model, x, self.device, self.amp)[:, 0].float()


def load_for_inference(path: str | os.PathLike, settings: PredictSettings) -> LoadedModel:
    """Load a model file for `predict`: device, model resolution (µm/px) and batch size resolved."""
    from ikdmil.device import resolve_device
    from ikdmil.models.checkpoint import load_model

    device = resolve_device(settings.device)
    model, meta = load_model(path, device)
    model = model.to(memory_format=torch.channels_last).eval()
    if settings.model_mpp is not None:
        mpp, source = float(settings.model_mpp), "--model-mpp"
    elif isinstance(meta.get("mpp"), (int, float)) and meta["mpp"] > 0:
        mpp, source = float(meta["mpp"]), "model file"
    else:
        mpp, source = DEFAULT_MODEL_MPP, "default (model file has no mpp)"
    batch = settings.batch_size or (32 if device.type == "cuda" else 4)
    logger.debug("model %s on %s: %s µm/px (%s), batch %d", path, device, mpp, source, batch)
    return LoadedModel(model, meta, Path(path), device, int(meta.get("input_size", 256)), mpp, source,
                       settings.amp, batch)


def gaussian_smooth(x: torch.Tensor, sigma: float, truncate: float = 4.0, conv: bool | None = None) -> torch.Tensor:
    """Gaussian blur of (B,H,W) maps on their device, equal to scipy.ndimage.gaussian_filter(mode="reflect").

    The same smoothing as `ikdmil.metrics.smooth_probability` (used by evaluation), but on the GPU
    when there is one, so that smoothing never becomes the bottleneck of slide inference (on the CPU,
    scipy is 3-60x faster than a 1-channel torch convolution, so it is used there; `conv` forces a path).
    """
    if sigma <= 0:
        return x
    if not (conv if conv is not None else x.device.type != "cpu"):
        from ikdmil.metrics import smooth_probability

        return torch.from_numpy(smooth_probability(x.float().numpy(), sigma))
    r = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / float(sigma)) ** 2)
    k = (k / k.sum()).to(x.device, torch.float32)
    y = x[:, None].float()
    for dim in (-1, -2):  # separable: along x then y, with half-sample symmetric padding (scipy "reflect")
        n = y.shape[dim]
        if r >= n:  # maps smaller than the kernel: let scipy handle the repeated reflections
            from ikdmil.metrics import smooth_probability

            return torch.from_numpy(smooth_probability(x.float().cpu().numpy(), sigma)).to(x.device)
        left = y.narrow(dim, 0, r).flip(dim)
        right = y.narrow(dim, n - r, r).flip(dim)
        y = torch.cat([left, y, right], dim)
        w = k.view(1, 1, 1, -1) if dim == -1 else k.view(1, 1, -1, 1)
        y = F.conv2d(y, w)
    return y[:, 0]


def tile_maps(lm: LoadedModel, batch: torch.Tensor, sigma: float, s: int):
    """(B, T/s, T/s) float32 numpy: fused maps, smoothed per tile as in evaluation, averaged down by s (on the device)."""
    fused = gaussian_smooth(lm.fused(batch), sigma)
    if s > 1:
        fused = F.avg_pool2d(fused[:, None], s)[:, 0]
    return fused.cpu().numpy()
