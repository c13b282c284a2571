"""Command-line plumbing shared by every `ikdmil` command: settings dataclasses as argparse options,
one-line usage errors, and the terminal logging handler.

A field of a settings dataclass (see `ikdmil.config`) becomes the option `option_flag(cls, name)`,
typed by its annotation (bool: ``--x/--no-x``), with its `Opt` help; every value given is
type- and bounds-checked on parsing by `check_value`, the same check the dataclass's `validate`
and the YAML loader run. A nested dataclass field (``PredictSettings.tissue``) becomes an argument
group of ``--tissue-*`` options. Options are None unless given, so `settings_from_args` can layer
defaults < config file < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from ikdmil.errors import IkdmilError
from ikdmil.typed_settings import (
    Opt,
    check_value,
    convert,
    field_types,
    load_settings,
    option_flag,
    option_of,
    optional_inner,
    settings_from_mapping,
)


# ----------------------------------------------------------------- parser classes
class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: raised as IkdmilError, which `main` prints
    as ``ikdmil: error: ...`` with exit status 2 like every other user error."""

    def error(self, message: str):
        raise IkdmilError(f"{message}; see `{self.prog} --help`")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless the default is None/False or the help already says what it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


# ----------------------------------------------------------------- values
def value_type(tp: Any, opt: Opt):
    """An argparse `type=` that converts text to `tp` and checks it against `opt` (one message per problem)."""

    def parse(text: str):
        try:
            value = convert(text, tp, opt)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        problem = check_value(opt, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def number(tp: type, **bounds) -> Any:
    """`value_type` for a hand-written numeric option, e.g. ``type=number(float, min=0, below=1)``."""
    return value_type(tp, Opt(**bounds))


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, str) else str(value)


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# ----------------------------------------------------------------- settings dataclass <-> options
def add_field_option(parser, flag: str, dest: str, tp: Any, opt: Opt, default: Any) -> None:
    text = opt.help
    if default is not None and "default" not in text:
        text += f" (default: {_default_text(default)})"
    text = text.replace("%", "%%")
    if optional_inner(tp)[0] is bool:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        return
    metavar = None if opt.choices else opt.metavar or dest.rsplit(".", 1)[-1].upper()
    parser.add_argument(flag, dest=dest, type=value_type(tp, opt), default=None, choices=opt.choices or None,
                        metavar=metavar, help=text)


def add_settings_options(parser, cls: type, skip: tuple = (), defaults: dict | None = None, dest_prefix: str = "",
                         flag_prefix: str = "") -> None:
    """One option per field of the settings dataclass `cls` (except `skip`); `defaults` overrides the
    defaults shown in --help (the command applies the same ones)."""
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, opt = types_[f.name], option_of(cls, f.name)
        if dataclasses.is_dataclass(tp):
            group = parser.add_argument_group(opt.help)
            add_settings_options(group, tp, dest_prefix=f"{dest_prefix}{f.name}.",
                                 flag_prefix=f"{flag_prefix}{f.name.replace('_', '-')}-")
            continue
        default = (defaults or {}).get(f.name, field_default(f))
        add_field_option(parser, option_flag(cls, f.name, flag_prefix), dest_prefix + f.name, tp, opt, default)


def given_values(args: argparse.Namespace, cls: type, dest_prefix: str = "", skip: tuple = ()) -> dict:
    """The options of `cls` given on the command line (nested dataclasses as nested dicts)."""
    out: dict = {}
    for name, tp in field_types(cls).items():
        if name in skip:
            continue
        if dataclasses.is_dataclass(tp):
            inner = given_values(args, tp, f"{dest_prefix}{name}.")
            if inner:
                out[name] = inner
            continue
        value = getattr(args, dest_prefix + name, None)
        if value is not None:
            out[name] = value
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def file_values(cls: type, path: str | Path, section: str | None = None) -> dict:
    """The settings of a YAML file as a plain dict, checked (errors name the file and key)."""
    return dataclasses.asdict(load_settings(cls, path, section))


def settings_from_args(cls: type, args: argparse.Namespace, base: dict | None = None, dest_prefix: str = "",
                       skip: tuple = (), **fixed):
    """An instance of `cls`: its defaults < `base` (e.g. `file_values`) < options given < `fixed` (not None)."""
    values = _merge(base or {}, given_values(args, cls, dest_prefix, skip))
    values.update({k: v for k, v in fixed.items() if v is not None})
    return settings_from_mapping(cls, values, "command line")


# ----------------------------------------------------------------- verbosity and logging
def add_verbosity_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """--quiet and -v, on the top-level parser (defaults) and on every command (SUPPRESS: an option given
    before the command is not reset by the command's parser)."""
    kw = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--quiet", action="store_true", help="no progress bars or progress messages, only results, "
                        "warnings and errors", **({"default": False} if top else kw))
    parser.add_argument("-v", "--verbose", action="count", help="also debug messages",
                        **({"default": 0} if top else kw))


class TerminalHandler(logging.Handler):
    """Messages of the `ikdmil` loggers on the terminal: INFO as plain lines on stdout (where the
    commands' results go), WARNING and above as ``ikdmil: warning: ...`` on stderr. Written through
    tqdm, so that a progress bar is not torn by a message, and to the current sys.stdout/stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            text = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"ikdmil: {record.levelname.lower()}: {text}"
            else:
                stream = sys.stdout
                text = f"[{record.name}] {text}" if record.levelno < logging.INFO else text
            tqdm.write(text, file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break a command
            self.handleError(record)


def configure_logging(quiet: bool, verbose: int) -> logging.Handler:
    """Attach a `TerminalHandler` to the `ikdmil` logger (not the root logger); remove it when done."""
    logger = logging.getLogger("ikdmil")
    handler = TerminalHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    return handler


def release_logging(handler: logging.Handler) -> None:
    logger = logging.getLogger("ikdmil")
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
