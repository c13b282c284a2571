"""Named variants (RunConfig overrides for one table row or curve), profiles (schedules), and the
stage-1 key that decides which variants can share one MIL teacher.

Every override goes through :func:`apply_overrides`, which builds the RunConfig with
`dataclasses.replace` and fails with one line when this ikdmil's RunConfig lacks a field, so a
variant written for a newer engine never runs with its setting silently dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from ikdmil.config import RunConfig
from ikdmil.errors import IkdmilError

# The authors' code: Adam with (coupled, L2) weight decay 5e-5 on losses summed over the batch. Adam
# is invariant to the gradient's scale, so a sum over B images with decay wd equals a mean over the
# batch with decay wd / B: grad_sum + wd * w = B * (grad_mean + (wd / B) * w). At batch 16 that is
# 5e-5 / 16 = 3.1e-6, i.e. our default 5e-4 is 160x (the "about 100x") stronger.
AUTHORS_WEIGHT_DECAY = 5e-5


@dataclass(frozen=True)
class Variant:
    """One named row: `overrides` (a dict, or a function of the profile's RunConfig giving one)
    applied to the profile's config; `student=False` reports the stage-1 teacher alone."""

    name: str
    help: str
    overrides: dict | Callable[[RunConfig], dict] = field(default_factory=dict)
    student: bool = True
    paper: str = ""  # where the paper reports it

    def resolve(self, cfg: RunConfig) -> dict:
        return dict(self.overrides(cfg) if callable(self.overrides) else self.overrides)


def _wce(a: float) -> Variant:
    return Variant(f"wce-{a:g}", f"wCE scale a = {a:g}", {"wce_scale": a}, paper="Table 4")


_ALL = [
    Variant("mil", "the stage-1 MIL teacher alone (test scores of the teacher)", student=False, paper="Tables 1-2"),
    Variant("ikd", "IKD-MIL as configured: fusion KD, teacher/student swaps, a = 0.25", paper="Tables 1-2"),
    Variant("kd-output", "KD structure of Fig. 2a: student fused <- teacher fused only",
            {"kd_structure": "output"}, paper="Figs. 5-6"),
    Variant("kd-block", "KD structure of Fig. 2b: student side i <- teacher side i, fused <- fused",
            {"kd_structure": "block"}, paper="Figs. 5-6"),
    Variant("kd-fusion", "KD structure of Fig. 2c (= ikd): every student map <- teacher fused",
            {"kd_structure": "fusion"}, paper="Figs. 5-6"),
    Variant("no-swap", "no teacher/student swaps: one cycle with the stage-1 teacher", {"swap": False},
            paper="Figs. 7-8"),
    Variant("no-wce", "no wCE regulariser (a = 0)", {"wce_scale": 0.0}, paper="Table 3"),
    *[_wce(a) for a in (0.0, 0.1, 0.25, 0.5, 1.0, 5.0)],
    # issue 11 (5.): HED stain jitter changes the teacher (stage 1), so these runs train their own teacher
    Variant("stain-aug", "IKD-MIL with HED stain jitter, --stain-augment 0.05", {"stain_augment": 0.05},
            paper="issue 11 (5.)"),
    Variant("stain-aug-mil", "the stage-1 teacher alone, trained with --stain-augment 0.05", {"stain_augment": 0.05},
            student=False, paper="issue 11 (5.)"),
    Variant("wd-authors", "weight decay of the authors' code: 5e-5 on batch sums = 5e-5 / batch size on "
            "our batch means (3.1e-6 at batch 16)",
            lambda cfg: {"weight_decay": AUTHORS_WEIGHT_DECAY / cfg.batch_size}, paper="issue 9 (7.)"),
    # issue 11: label-only model selection. `selection` is a stage-1 field, so this row gets a teacher of its
    # own (teacher-select-auc/), chosen by AUC too; its `teacher` model is the label-only counterpart of `mil`.
    Variant("select-auc", "ikd with every choice (epochs, fusion weights, swaps, final model) made by the "
            "validation image AUC: image labels only, even where masks exist", {"selection": "auc"},
            paper="issue 11 (4.)"),
    # Table 1's comparison rows: other training methods (ikdmil.methods), each one standalone run per seed
    # that reports its segmentation network (model "segnet"); they share no teacher with IKD.
    Variant("oeem", "OEEM: CAM pseudo-masks -> segmentation network with online easy-example mining",
            {"method": "oeem"}, paper="Table 1"),
    Variant("oaa", "OAA: CAMs accumulated (max) over classifier epochs -> pseudo-masks -> segmentation network",
            {"method": "oaa"}, paper="Table 1"),
    Variant("pistoseg", "PistoSeg: mosaics with exact masks + feature consistency -> refined pseudo-masks -> "
            "segmentation network", {"method": "pistoseg"}, paper="Table 1"),
    Variant("supervised-unet", "fully supervised reference: U-Net-style decoder trained on the pixel masks "
            "(Dice + BCE); the ceiling row", {"method": "supervised-unet"}, paper="Table 1 (CAC-UNet row)"),
]
VARIANTS: dict[str, Variant] = {v.name: v for v in _ALL}

# Table 2: each backbone's baseline teacher is trained with its own paper's MIL loss. VGG16 is
# IKD-MIL's own teacher (Dice MIL loss); SA-MIL, Swin-MIL and the ResNet-MIL baselines pool the map
# to an image score (GeM) with BCE. Backbones not listed use the profile's teacher_loss.
TEACHER_LOSS_BY_BACKBONE = {"vgg16": "dice", "sa_mil": "gem", "swin_t": "gem",
                            "resnet18": "gem", "resnet34": "gem", "resnet50": "gem"}


@dataclass(frozen=True)
class Profile:
    """RunConfig overrides for a schedule; `optional` ones are applied only when RunConfig has the
    field (reporting and cadence settings of newer engines: val_every, track_test)."""

    name: str
    help: str
    overrides: dict
    optional: dict = field(default_factory=dict)


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("smoke", "seconds: 32 px, random init, one or two tiny epochs per phase (tests)",
            dict(input_size=32, batch_size=4, pretrained="none", lr=1e-3, teacher_epochs=1, fusion_epochs=1,
                 distill_epochs=2, swap_every=1, eval_sigma=0.0, teacher_cache=True, cam_epochs=1, seg_epochs=1),
            dict(val_every=1, track_test=True)),
    # cpu: sized by a measurement on this 2-core CPU (GlaS prepared by `ikdmil prepare glas`: 68 train, 17 val,
    # 80 test images; 128 px, batch 16, VGG16 ImageNet init, torch 2.13 CPU; other jobs on the machine
    # at load ~2.5): teacher epoch (train + val) 15.5 s, distillation epoch (train + val) 16.8 s, test
    # evaluation 4-6 s, validation 1 s, teacher-map refresh (one view, 68 images) 6-8 s, fusion epoch ~6 s.
    # Estimate: teacher run 8 x 15.5 + 2 x 6 + ~10 (caching, test) = ~146 s; distillation run
    # 8 x (16.8 + 4.5 test_f1 per epoch) + 2 refreshes x 7 + ~15 (teacher val, 2 test evaluations) = ~200 s;
    # per seed 146 + 3 x 200 = ~750 s, so {mil, ikd, no-swap, no-wce} x 3 seeds = ~37 min (a fully
    # loaded machine, load 6-7, made the same epochs 3.5x slower). An engine that caches the teacher's
    # 8 dihedral views refreshes ~8x slower (~50 s per cycle): then about +10 min.
    # The comparison rows get as many epochs as IKD's stages: 8 classifier epochs (the teacher's 8) and 8
    # epochs per segmentation-network phase (the distillation's 8). Estimated from the measurements above
    # (not measured: the decoder adds ~13 % to VGG16's 6.1 GFLOP per 128 px image, so a segmentation epoch
    # is ~17 s + 4.5 s test_f1; a classifier epoch ~14.5 s): oeem ~5 min, oaa ~5.5 min, pistoseg ~12 min
    # (its mosaic phase runs three images per step), supervised-unet ~3 min per seed; with mil + ikd
    # (~6 min) all of Table 1 is ~31 min per seed, ~95 min for 3 seeds on an otherwise idle machine.
    Profile("cpu", "GlaS at 128 px on a 2-core CPU: 8 teacher + 2 fusion + 8 distillation epochs, swap check "
            "every 4; {mil, ikd, no-swap, no-wce} x 3 seeds in about 37 min; comparison rows: 8 classifier + 8 "
            "epochs per segmentation phase",
            dict(input_size=128, batch_size=16, teacher_epochs=8, fusion_epochs=2, distill_epochs=8, swap_every=4,
                 cam_epochs=8, seg_epochs=8),
            dict(val_every=1, track_test=True)),
    Profile("paper", "the paper's schedule: 256 px, 30 teacher + 10 fusion + 450 distillation epochs, swap every 30; "
            "comparison rows (our schedule, not their papers'): 30 classifier + 100 epochs per segmentation phase",
            dict(input_size=256, batch_size=16, teacher_epochs=30, fusion_epochs=10, distill_epochs=450, swap_every=30,
                 cam_epochs=30, seg_epochs=100),
            dict(val_every=1, track_test=True)),
]}

# Fields only stage 2 reads: runs that differ only in these can share one stage-1 teacher. Every other
# field (including any the engine adds later) counts as a stage-1 setting, so sharing is conservative.
STAGE2_FIELDS = ("distill_epochs", "swap_every", "wce_scale", "kd_structure", "swap", "teacher_cache")
# Fields that change where or how fast a run computes, not what it computes: a finished run is reused
# whatever they were. (`data` is compared: the experiment resolves it to an absolute path.)
MACHINE_FIELDS = ("out", "device", "workers", "loader", "cache_dir", "compile", "compile_mode")
# Fields added after runs were keyed: left out of a key while at their default, so that finished runs of
# before keep their keys (and are reused) whenever they computed the same thing.
KEYED_FROM_DEFAULT = {"selection": "auto", "selection_top_percent": 10.0}
# What the code computes for a config beyond its fields, part of every key: runs of an earlier pipeline are
# never reused as this one's (2: images rescaled isotropically, random crops, whole-image scoring; 1 squeezed
# every image to a square).
PIPELINE = 2
# Fields only the comparison methods (ikdmil.methods other than ikd) read.
METHOD_FIELDS = ("cam_epochs", "seg_epochs", "cam_threshold", "head_lr_scale", "decoder_width", "mosaic_grid",
                 "consistency_scale")


def config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RunConfig)}


def missing_fields(overrides: dict) -> list[str]:
    return sorted(set(overrides) - config_fields())


def apply_overrides(cfg: RunConfig, overrides: dict, source: str) -> RunConfig:
    """`dataclasses.replace(cfg, **overrides)`, or one line naming the fields this RunConfig lacks."""
    unknown = missing_fields(overrides)
    if unknown:
        raise IkdmilError(f"{source} needs RunConfig field(s) {', '.join(unknown)}, which this ikdmil does not "
                          f"have; update ikdmil or drop {source}")
    return dataclasses.replace(cfg, **overrides)


def profile_config(profile: Profile, base: RunConfig) -> tuple[RunConfig, list[str]]:
    """The profile's RunConfig and the optional fields it had to leave out."""
    have = config_fields()
    optional = {k: v for k, v in profile.optional.items() if k in have}
    skipped = sorted(set(profile.optional) - have)
    return apply_overrides(base, {**profile.overrides, **optional}, f"profile {profile.name!r}"), skipped


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def comparable(cfg: RunConfig) -> dict:
    """What a run computes: the config without the machine fields and the `KEYED_FROM_DEFAULT` fields at
    their default, and for IKD runs without `method` and the fields only the other methods read (so IKD runs
    keep the keys they had before those existed)."""
    d = {k: v for k, v in cfg.to_dict().items()
         if k not in MACHINE_FIELDS and not (k in KEYED_FROM_DEFAULT and v == KEYED_FROM_DEFAULT[k])}
    if d.get("method", "ikd") == "ikd":
        d = {k: v for k, v in d.items() if k not in ("method", *METHOD_FIELDS)}
    return {**d, "pipeline": PIPELINE}


def is_method_run(cfg: RunConfig) -> bool:
    """A comparison row: one standalone run of another training method (no shared teacher)."""
    return getattr(cfg, "method", "ikd") != "ikd"


def run_key(cfg: RunConfig) -> str:
    return _digest(comparable(cfg))


def stage1_key(cfg: RunConfig) -> str:
    """Equal for configs whose stage-1 teacher (and fusion fit) would be the same."""
    return _digest({k: v for k, v in comparable(cfg).items() if k not in STAGE2_FIELDS})
