"""A trained model ready for inference: loading, the eval-mode forward pass, and map smoothing.

`fused_forward` is the one eval-mode forward path of the project: evaluation
(`ikdmil.engine.evaluate.iter_fused`) and slide/patch inference (`LoadedModel.fused`) both call it,
so a model is run the same way wherever its maps are scored or written. Inputs are uint8 RGB
batches (B,3,H,W) (the model normalises them itself); they are moved to the device in channels-last
memory format and run under `ikdmil.device.autocast` (bf16 on CUDA when `amp`, fp32 on CPU).

`receptive_reach` measures how far a fully convolutional backbone's output reaches into its input
(the half-width of its theoretical receptive field, through the bilinear upsampling of the side
maps) and its output stride, by pushing a delta through a copy in which every conv is a 0/1
window of its geometry: an output is then non-zero exactly where it depends on the delta. Slide
inference uses it to size the overlap of large tiles for backbones registered as tile-invariant.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ikdmil.device import autocast
from ikdmil.errors import IkdmilError
from ikdmil.inference.onnx_backend import OnnxFused, resolve_backend
from ikdmil.inference.settings import DEFAULT_MODEL_MPP, MAX_SLIDE_MPP, PredictSettings
from ikdmil.stain import MacenkoReference, ReinhardReference, StainStats, from_meta, reference_from_meta

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
    reach: int | None = None  # model px an output depends on around it (tile-invariant backbones only)
    net_stride: int = 1  # the backbone's coarsest output stride (tile origins are aligned to it)
    stain: StainStats | None = None  # the training data's stain statistics (None: the file has none)
    # with --stain-normalise reinhard|macenko: the training data's reference for that method
    stain_reference: ReinhardReference | MacenkoReference | None = None
    backend: str = "torch"  # torch | onnxruntime (`ikdmil.inference.onnx_backend`)
    runner: object | None = None  # the ONNX Runtime fused map when backend is onnxruntime

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """(B,H,W) float32 fused probability on the device for a uint8 (B,3,H,W) batch.

        Raises a one-line IkdmilError naming the model file (the caller adds the input) when an output
        is NaN or infinite: such a value would make every map, measurement and JSON file downstream
        meaningless or invalid.
        """
        y = (self.runner(x) if self.runner is not None else fused_forward(self.model, x, self.device, self.amp))
        y = y[:, 0].float()
        if not bool(torch.isfinite(y).all()):
            raise IkdmilError(
                f"the model {self.path} gives NaN or infinite values on this input (its weights overflow on "
                "it), so nothing was written for it; use another model file (e.g. an earlier checkpoint), or "
                "--no-amp if this happens only with AMP on CUDA"
            )
        return y


def load_for_inference(path: str | os.PathLike, settings: PredictSettings,
                       device: torch.device | None = None) -> LoadedModel:
    """Load a model file for `predict`: device, model resolution (µm/px) and batch size resolved.

    `device`: where to run (a torchrun rank's own GPU); None: `settings.device` resolved.
    """
    from ikdmil.device import resolve_device
    from ikdmil.models.checkpoint import load_model

    device = device or resolve_device(settings.device)
    model, meta = load_model(path, device)
    _check_finite_weights(model, path)
    model = model.to(memory_format=torch.channels_last).eval()
    if settings.model_mpp is not None:
        mpp, source = float(settings.model_mpp), "--model-mpp"
    elif meta.get("mpp") is not None:
        mpp, source = _meta_number(path, meta, "mpp", float, "--model-mpp", "a resolution in µm/px",
                                   lambda v: 0 < v <= MAX_SLIDE_MPP), "model file"
    else:
        mpp, source = DEFAULT_MODEL_MPP, "default (model file has no mpp)"
    batch = settings.batch_size or (32 if device.type == "cuda" else 4)
    if settings.tile_size is not None and not _meta_ok(meta.get("input_size", 256), int, lambda v: v >= 16):
        input_size = settings.tile_size  # the option stands in for damaged metadata
    else:
        input_size = _meta_number(path, meta, "input_size", int, "--tile-size", "a size in px of at least 16",
                                  lambda v: v >= 16, default=256)
    lm = LoadedModel(model, meta, Path(path), device, input_size, mpp, source, settings.amp, batch,
                     stain=from_meta(meta, path),
                     stain_reference=None if settings.stain_normalise == "none"
                     else reference_from_meta(meta, path, settings.stain_normalise))
    if settings.tile_size is None and settings.overlap is None:
        lm.reach, lm.net_stride = _reach_of(model, meta)
    lm.backend = resolve_backend(settings.backend, device)
    if lm.backend == "onnxruntime":
        lm.runner = OnnxFused(model)
    logger.debug("model %s on %s: %s µm/px (%s), batch %d, reach %s px", path, device, mpp, source, batch, lm.reach)
    return lm


def _meta_ok(value, tp: type, ok) -> bool:
    from ikdmil.typed_settings import coerce

    try:
        v = coerce(value, tp)
    except ValueError:
        return False
    return math.isfinite(v) and ok(v)


def _meta_number(path, meta: dict, key: str, tp: type, option: str, what: str, ok, default=None):
    """meta[key] as `tp` when `ok`, else a one-line error naming the model file, the key and the option."""
    from ikdmil.typed_settings import coerce

    raw = meta.get(key, default)
    if _meta_ok(raw, tp, ok):
        return coerce(raw, tp)
    raise IkdmilError(f"{path}: model metadata {key} is {raw!r}, expected {what}; the file is damaged or was "
                      f"edited: pass {option} to override it, or use another model file")


def _check_finite_weights(model: torch.nn.Module, path) -> None:
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise IkdmilError(f"{path}: weight {name} holds NaN or infinite values (training diverged, or the file "
                              "is damaged), so every output would be NaN; use another model file, e.g. an earlier "
                              "checkpoint or the teacher")


def _reach_of(model: torch.nn.Module, meta: dict) -> tuple[int | None, int]:
    from ikdmil.models.registry import is_tile_invariant

    name = getattr(model, "name", None) or meta.get("backbone")
    backbone = getattr(model, "backbone", None)
    if not name or backbone is None or not is_tile_invariant(name):
        return None, 1
    found = receptive_reach(backbone)
    if found is None:
        logger.warning("backbone %s: receptive field wider than the probe; using small tiles", name)
        return None, 1
    return found


class _Footprint(nn.Module):
    """Stands in for a conv in `receptive_reach`: 1 where any channel of a (k x k) window of the same
    stride, padding and dilation is non-zero, else 0, expanded (not copied) to the output channels."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        self.kernel = conv.kernel_size
        self.out_channels = conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1] if x.stride(1) == 0 else x.amax(1, keepdim=True)  # channels are copies / any one counts
        y = F.conv2d(x, torch.ones(1, 1, *self.kernel, dtype=x.dtype), **self.conv)
        return (y > 0).to(x.dtype).expand(-1, self.out_channels, -1, -1)  # 0/1: nothing under- or overflows


def _footprint_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose output is non-zero exactly where it depends on a non-zero input."""
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}  # never copied, never changed
    module = copy.deepcopy(module, memo=shared)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, _Footprint(child))
            elif isinstance(child, (nn.BatchNorm2d, nn.ReLU)):  # affine / sign: no spatial reach
                setattr(parent, name, nn.Identity())
    return module.eval()


@torch.no_grad()
def receptive_reach(backbone: nn.Module, height: int = 32, max_width: int = 4096) -> tuple[int, int] | None:
    """(reach, stride) in input px of a fully convolutional backbone; None when it cannot be measured.

    `reach`: a side map upsampled to the input size (bilinear, as `MILSegmenter` does) at a pixel
    depends only on input pixels closer than `reach` along each axis: the theoretical receptive field,
    whatever the weights. `stride`: the coarsest feature stride. Measured by pushing a delta through
    a copy in which every conv is a 0/1 "any non-zero in the window" of the same geometry (one
    channel, so it is cheap) and BatchNorm and ReLU are dropped: the non-zero columns of each
    feature map are its footprint. None when the footprint is wider than `max_width` or a module does not
    accept the probe (then the small-tile path is used).

    Example:
        >>> from ikdmil.models import create_model
        >>> receptive_reach(create_model("vgg16", pretrained="none")[0].backbone)
        (23, 4)
    """
    try:
        probe = _footprint_copy(backbone)
    except Exception:  # noqa: BLE001 - an unusual backbone: no large tiles, never a failure
        return None
    width = 256
    while width <= max_width:
        x = torch.zeros(1, 3, height, width)
        centre = width // 2
        x[0, :, height // 2, centre] = 1.0
        try:
            feats = probe(x)
        except RuntimeError:
            return None
        reach, stride = 0, 1
        for f in feats:
            cols = (f[0].abs().amax(dim=(0, 1)) > 0).nonzero()[:, 0].double()
            if not len(cols) or cols.min() == 0 or cols.max() == f.shape[-1] - 1:
                break  # the footprint touches the strip's end: try a wider one
            s = width / f.shape[-1]
            centres = (cols + 0.5) * s - 0.5  # feature cells' centres in input px
            reach = max(reach, math.ceil(float((centres - centre).abs().max()) + s))  # + bilinear support
            stride = max(stride, round(s))
        else:
            return reach, stride
        width *= 2
    return None


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
    r = gaussian_radius(sigma, truncate)
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


def gaussian_radius(sigma: float, truncate: float = 4.0) -> int:
    """Half-width (px) of `gaussian_smooth`'s kernel, as scipy.ndimage's; 0 when sigma is 0."""
    return int(truncate * float(sigma) + 0.5) if sigma > 0 else 0


def tile_maps(lm: LoadedModel, batch: torch.Tensor, sigma: float, s: int):
    """(B, T/s, T/s) float32 numpy: fused maps, smoothed per tile as in evaluation, averaged down by s
    (on the device)."""
    fused = gaussian_smooth(lm.fused(batch), sigma)
    if s > 1:
        fused = F.avg_pool2d(fused[:, None], s)[:, 0]
    return fused.cpu().numpy()
