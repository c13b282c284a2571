"""Pretrained weights from a user's local file, for any backbone: read safely, map keys, check shapes.

Nothing is ever downloaded. :func:`weights_file` resolves a ``--pretrained`` value,
:func:`read_state_dict` reads a torchvision/timm/official state dict (``.pth``/``.pt`` with
``torch.load(weights_only=True)``, or ``.safetensors``), and :func:`load_renamed_state` maps its keys
onto a module, checks every shape and reports what loaded. VGG16's bundled ImageNet weights and its
BatchNorm folding live in :mod:`ikdmil.models.vgg_weights`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ikdmil.errors import IkdmilError

__all__ = ["load_state_dict", "unwrap_state", "strip_module", "weights_file", "read_state_dict", "load_renamed_state"]


def load_state_dict(path: Path, what: str) -> Any:
    """A user's weights file read without running code: safetensors, or ``torch.load(weights_only=True)``."""
    if not path.is_file():
        raise IkdmilError(f"{path}: {what} weights file not found (give an existing file)")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise IkdmilError(
                f"{path}: not a readable .safetensors file ({type(e).__name__}: {e}); "
                f"re-export the state dict with safetensors.torch.save_file"
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IkdmilError(
            f"{path}: cannot be read as a weights-only torch state dict ({type(e).__name__}); the file is "
            f"damaged or holds pickled objects, which are never loaded: save the weights alone with "
            f"torch.save(model.state_dict(), FILE) or safetensors.torch.save_file(model.state_dict(), FILE)"
        ) from None


def unwrap_state(sd: Any) -> Any:
    """The state dict inside common checkpoint wrappers (``state_dict`` / ``model`` keys)."""
    for _ in range(3):  # e.g. {'state_dict': {...}} or {'model': {...}}
        if not isinstance(sd, Mapping):
            break
        inner = next(
            (sd[k] for k in ("state_dict", "model") if isinstance(sd.get(k), Mapping)), None
        )
        if inner is None:
            break
        sd = inner
    return sd


def strip_module(key: str) -> str:
    """A key without DataParallel/DDP ``module.`` prefixes."""
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def weights_file(source: str | None, name: str) -> tuple[Path | None, str]:
    """Resolve ``--pretrained`` for a family without bundled weights: ``(path or None, message)``.

    ``None`` / ``"imagenet"`` -> no file (nothing is downloaded, ever), ``"none"`` / ``"scratch"``
    -> random init, anything else must be an existing weights file.
    """
    key = None if source is None else str(source).strip()
    if key is None or key.lower() == "imagenet":
        return None, f"no ImageNet weights bundled for {name}; pass --pretrained FILE; training from scratch"
    if key.lower() in ("none", "scratch"):
        return None, "random init"
    path = Path(key).expanduser()
    if not path.is_file():
        raise IkdmilError(
            f"{path}: {name} weights file not found; give an existing .pth/.pt/.safetensors file, "
            f"'imagenet' or 'none'"
        )
    return path, ""


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A weights-only state dict from ``.pth``/``.pt``/``.safetensors``: wrappers and ``module.`` removed."""
    path = Path(path)
    raw = unwrap_state(load_state_dict(path, what))
    if not isinstance(raw, Mapping):
        raise IkdmilError(
            f"{path}: expected a state dict (mapping of names to tensors), found "
            f"{type(raw).__name__}; save model.state_dict() instead"
        )
    return {strip_module(str(k)): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def load_renamed_state(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    what: str,
    rename,
    new_prefixes: tuple[str, ...] = (),
    layout: str = "",
) -> str:
    """Copy ``state`` into ``module`` after ``rename(key) -> our key | None (not used by us)``.

    Refuses (:class:`IkdmilError` naming the file) a state dict with a tensor of another shape, a
    tensor that maps to nothing in the module or a module tensor it lacks (another depth or width),
    or nothing usable at all. Tensors under ``new_prefixes`` (parts the pretrained model never had,
    e.g. side-output norms) and BatchNorm's ``num_batches_tracked`` may be absent. Returns a
    one-line report of what was loaded, what in the file was not used and what is new.
    """
    path = Path(path)
    own = module.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unused, unknown, bad = [], [], []
    for key, value in state.items():
        ours = rename(key)
        if ours is None:
            unused.append(key)
        elif ours not in own:
            unknown.append(key)
        elif tuple(own[ours].shape) != tuple(value.shape):
            bad.append(f"{key} {tuple(value.shape)} (expected {tuple(own[ours].shape)})")
        else:
            mapped[ours] = value
    if bad:
        raise IkdmilError(
            f"{path}: {len(bad)} tensor(s) do not fit {what}, e.g. {bad[0]}; this file is for another "
            f"model: give a {what} state dict"
        )
    if unknown:
        raise IkdmilError(
            f"{path}: {len(unknown)} tensor(s) have no place in {what} (e.g. {unknown[0]}); this file is "
            f"for another architecture or depth: give a {what} state dict"
        )
    if not mapped:
        sample = ", ".join(sorted(state)[:5]) or "no tensors"
        raise IkdmilError(
            f"{path}: no {what} weights in this file (keys start with: {sample}); give a {what} state dict"
        )
    expected_absent = {k for k in own if k.startswith(new_prefixes) or k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(mapped) - expected_absent)
    if missing:
        raise IkdmilError(
            f"{path}: {len(missing)} {what} tensor(s) are not in this file (e.g. {missing[0]}); it is for a "
            f"smaller model or incomplete: give a complete {what} state dict"
        )
    bad_values = [k for k, v in mapped.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad_values:
        raise IkdmilError(f"{path}: {bad_values[0]} contains NaN or infinite values; use an intact file")
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value.to(own[key].dtype))
    n_new = sum(1 for k in own if k.startswith(new_prefixes)) if new_prefixes else 0
    parts = [f"{len(mapped)} tensors loaded", f"{len(unused)} unused (not part of this backbone)"]
    if n_new:
        parts.append(f"{n_new} new (random init: {', '.join(new_prefixes)})")
    return f"{what} weights from {path}{f' ({layout})' if layout else ''}: {'; '.join(parts)}"
