"""Typed settings: per-field option metadata (`Opt`), type coercion and bound checks, and the one YAML
loader. The settings dataclasses themselves live in `ikdmil.config` (RunConfig, EvaluateSettings,
DemoSettings), `ikdmil.inference.settings` (PredictSettings) and `ikdmil.slide.tissue` (TissueParams).

A field is an option `--field-name` typed by its annotation. Its help, flag, bounds and choices come
from the class's `OPTIONS` mapping of `Opt`; a field without an entry gets its trailing `#` comment
(else its name) as help, is type-checked, and, when it is a number, must be finite. So a new field is
a new command-line and config option with no other edit.

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
from typing import Any

import yaml

from ikdmil.errors import IkdmilError
from ikdmil.io import one_line

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
