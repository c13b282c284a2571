"""`PredictSettings`: every option of `ikdmil predict`, with its defaults and its checks.

The command line is generated from the fields (see `ikdmil.config`): help, flags and bounds are in
`PredictSettings.OPTIONS`; the tissue-detection fields (`TissueParams`) become `--tissue-*` options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from ikdmil.slide.tissue import TissueParams
from ikdmil.stain import NORMALISE
from ikdmil.typed_settings import Opt, check_settings

DEFAULT_MODEL_MPP = 0.5  # 20x: the resolution models are assumed to be trained at unless they say otherwise
MAX_SLIDE_MPP = 20.0  # µm/px: coarser is a magnification or a screen dpi, not a slide's resolution


def colour_problem(colour: tuple[int, int, int]) -> str | None:
    return None if all(0 <= c <= 255 for c in colour) else f"give R,G,B with 0-255 each, got {list(colour)}"


def device_problem(device: str) -> str | None:
    ok = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    return None if ok else f"must be auto, cpu, cuda or cuda:N (got {device!r})"


def parse_colour(text: str) -> tuple[int, int, int]:
    """'R,G,B' (0-255 each) or '#RRGGBB' as a tuple; ValueError saying what to write otherwise."""
    t = text.strip()
    try:
        if t.startswith("#") and len(t) == 7:
            return tuple(int(t[i:i + 2], 16) for i in (1, 3, 5))
        parts = [int(v) for v in t.split(",")]
        if len(parts) == 3 and all(0 <= v <= 255 for v in parts):
            return tuple(parts)
    except ValueError:
        pass
    raise ValueError(f"give R,G,B (0-255 each, e.g. 200,0,0) or #RRGGBB, got {text!r}")


@dataclass
class PredictSettings:
    """Every option of `ikdmil predict`; saved next to the outputs as predict_config.yaml."""

    model_mpp: float | None = None  # None: the model file's "mpp", else DEFAULT_MODEL_MPP
    mpp: float | None = None  # override the slides' resolution (µm per level-0 px)
    tile_size: int | None = None  # model px; None: the model's input size
    overlap: int | None = None  # model px; None: tile_size // 4 (rounded to out_stride)
    out_stride: int = 4  # model px per output px of the probability map
    batch_size: int | None = None  # tiles per forward pass; None: 4 on CPU (memory), 32 on CUDA
    workers: int = -1  # tile-reading processes; -1: automatic
    threshold: float = 0.5
    sigma: float = 3.0  # Gaussian smoothing of each tile's map (model px) before stitching; 0 = off
    min_tissue: float = 0.0  # a tile is processed when its tissue fraction is above this
    tissue: TissueParams = field(default_factory=TissueParams)
    tissue_mask: str | None = None  # mask image / GeoJSON, or a folder of NAME.{png,geojson,...}
    all_tissue: bool = False  # process every tile (no tissue detection)
    min_area_um2: float = 2000.0  # GeoJSON: polygons and holes smaller than this are dropped
    class_name: str = "Tumor"
    colour: tuple[int, int, int] = (200, 0, 0)
    thumbnail_size: int = 2048
    mode: str = "auto"  # auto | slide | patch
    patch_max: int = 2048  # auto mode: plain images up to this size (longest side) are patches
    device: str = "auto"
    amp: bool = True
    overwrite: bool = False
    large_tiles: bool = False
    backend: str = "auto"  # auto | torch | onnxruntime (see ikdmil.inference.onnx_backend)
    stain_normalise: str = "none"  # none | reinhard | macenko (ikdmil.stain): map each slide's stain onto training's

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["colour"] = list(self.colour)
        return d

    def validate(self) -> PredictSettings:
        """Types and bounds of every field (tissue settings included); the error names the option."""
        return check_settings(self)

    # help, flags and bounds per field (`ikdmil.config.Opt`); the help says what the default means
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "model_mpp": Opt(f"resolution the model was trained at, µm/px (default: the model file's, else "
                         f"{DEFAULT_MODEL_MPP} = 20x)", above=0),
        "mpp": Opt("the slides' resolution in µm per level-0 px, overriding (or standing in for missing) metadata",
                   above=0, max=MAX_SLIDE_MPP,
                   hint="give micrometres per pixel (0.25 at 40x, 0.5 at 20x), not a magnification"),
        "tile_size": Opt("tile side in model px (default: the model's input size)", min=16),
        "overlap": Opt("tile overlap in model px (default: a quarter of the tile)", min=0),
        "out_stride": Opt("model px per probability-map px (the map is at model mpp x stride)", min=1),
        "batch_size": Opt("tiles per forward pass (default: 4 on CPU, 32 on CUDA)", min=1),
        "workers": Opt("tile-reading processes (default: automatic: 0 on a 2-core CPU, 1 with more cores, up to "
                       "8 with CUDA)", min=-1),
        "threshold": Opt("tumour when probability >= this", above=0, below=1),
        "sigma": Opt("Gaussian smoothing of each tile's map, model px, as in evaluation (0 = off)",
                     min=0),
        "min_tissue": Opt("process a tile when its tissue fraction is above this (default: 0 = any tissue)",
                          min=0, below=1),
        "tissue": Opt("tissue detection (saturation threshold + morphology on an overview)"),
        "tissue_mask": Opt("tissue mask instead of detection: an image (non-zero = tissue, any scale) or GeoJSON "
                           "in level-0 px, or a folder of NAME.png / NAME.geojson per slide"),
        "all_tissue": Opt("no tissue detection: process every tile"),
        "min_area_um2": Opt("GeoJSON: drop polygons and fill holes smaller than this, µm²",
                            flag="--min-area", min=0),
        "class_name": Opt("GeoJSON classification name"),
        "colour": Opt("GeoJSON classification colour R,G,B or #RRGGBB (default: 200,0,0)", parse=parse_colour,
                      check=colour_problem, metavar="R,G,B"),
        "thumbnail_size": Opt("long side of overlay.png / heatmap.png in px (at most the slide's own), read from the "
                              "slide's pyramid whatever --out-stride", min=16),
        "mode": Opt("auto: OpenSlide formats and plain images larger than --patch-max are slides, other images "
                    "patches", flag="--as", choices=("auto", "slide", "patch")),
        "patch_max": Opt("auto: largest patch image side", min=1),
        "device": Opt("auto | cpu | cuda | cuda:N", check=device_problem),
        "amp": Opt("bf16 autocast on CUDA"),
        "backend": Opt("model runtime: auto (ONNX Runtime on CPU when installed: pip install 'ikdmil[onnx]', "
                       "measured 1.35x a slide's throughput there, same maps; else PyTorch) | torch | onnxruntime",
                       choices=("auto", "torch", "onnxruntime")),
        "stain_normalise": Opt("stain normalisation onto the training data's stain (stored in the model file), "
                               "measured once per slide on its tissue overview, or per patch: none | reinhard = "
                               "match the haematoxylin / eosin mean and std | macenko = the slide's own stain "
                               "vectors replaced by the training data's, concentrations rescaled",
                               choices=NORMALISE),
        "overwrite": Opt("redo slides already done with the same settings (default: skip them)"),
        "large_tiles": Opt("fully convolutional backbones (vgg16, resnet*): tiles of 384-2048 px, per slide the "
                           "size that computes the fewest pixels on its tissue, whose map equals one pass over the "
                           "whole slide (see README: Speed)"),
    }
