"""`PredictSettings`: every option of `ikdmil predict`, with its defaults and its checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ikdmil.errors import IkdmilError
from ikdmil.slide.tissue import TissueParams

DEFAULT_MODEL_MPP = 0.5  # 20x: the resolution models are assumed to be trained at unless they say otherwise


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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["colour"] = list(self.colour)
        return d

    def validate(self) -> "PredictSettings":
        checks = [
            (self.out_stride >= 1, "--out-stride must be at least 1"),
            (self.batch_size is None or self.batch_size >= 1, "--batch-size must be at least 1"),
            (0.0 < self.threshold < 1.0, "--threshold must be in (0, 1)"),
            (self.sigma >= 0, "--sigma must be >= 0"),
            (0.0 <= self.min_tissue < 1.0, "--min-tissue must be in [0, 1)"),
            (self.min_area_um2 >= 0, "--min-area must be >= 0"),
            (self.mode in ("auto", "slide", "patch"), "--as must be auto, slide or patch"),
            (self.model_mpp is None or self.model_mpp > 0, "--model-mpp must be positive"),
            (self.mpp is None or self.mpp > 0, "--mpp must be positive"),
            (self.thumbnail_size >= 16, "--thumbnail-size must be at least 16"),
            (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             "--device must be auto, cpu or cuda"),
        ]
        for ok, msg in checks:
            if not ok:
                raise IkdmilError(msg)
        return self
