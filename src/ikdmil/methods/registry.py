"""The one place that knows training-method names.

A method turns a `RunConfig` into model files in `cfg.out` that `ikdmil evaluate` and `predict`
accept (`teacher.safetensors`, `student.safetensors` for IKD, `segnet.safetensors` for the comparison
rows; always `model.safetensors`, the one selected on validation), and returns the results
dict it wrote to `cfg.out/results.json` (`models` -> role -> `val_score`, `test` metrics; `selected`).

Register one with `@register_method("name", summary=...)` on a function
`train(cfg, *, resume=False, progress=True, **options) -> dict`. Most methods subclass
`ikdmil.engine.run.TrainingRun`, which already owns the data, loader, checkpoints, validation
scoring and `finish` (test metrics, `results.json`), and add only their phases: a CAM baseline is
one file in this package (on `ikdmil.methods.cam.CamRun` / `ikdmil.methods.base.SegRun`) plus its
line in `BUILTIN` below.

Built in: `ikd` (IKD-MIL, the default), `oeem`, `oaa`, `pistoseg` (CAM pseudo-supervision
baselines, `ikdmil.methods.cam`), `supervised-unet` (the fully supervised reference, the only one
that reads training masks).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ikdmil.errors import IkdmilError

#: modules of this package that register the built-in methods (imported on first lookup)
BUILTIN = ("ikdmil.methods.ikd", "ikdmil.methods.oeem", "ikdmil.methods.oaa", "ikdmil.methods.pistoseg",
           "ikdmil.methods.supervised")


@dataclass(frozen=True)
class Method:
    """A registered training method."""

    name: str
    train: Callable[..., dict]  # train(cfg, *, resume=False, progress=True, **options) -> results dict
    summary: str = ""


_REGISTRY: dict[str, Method] = {}


def register_method(name: str, summary: str = ""):
    """Decorator: register `train(cfg, *, resume, progress, **options) -> dict` under `name`."""

    def deco(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = Method(name, fn, summary)
        return fn

    return deco


def _load_builtins() -> None:
    for module in BUILTIN:
        importlib.import_module(module)


def available_methods() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The method registered as `name`, or a one-line error listing the known ones."""
    _load_builtins()
    if name not in _REGISTRY:
        raise IkdmilError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}")
    return _REGISTRY[name]
