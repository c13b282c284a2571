"""Model files: safetensors weights plus metadata that says which model they belong to.

A model file written here loads without running any pickled code, and loading a file made for
another backbone (or not made by ikdmil at all) fails with a message instead of a shape traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ikdmil.data.io import atomic_path
from ikdmil.errors import IkdmilError

FORMAT = "ikdmil-model-1"


def save_model(model, path: str | Path, **meta) -> Path:
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"format": FORMAT, "backbone": model.name, **meta}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"ikdmil": json.dumps(info)})
    return path


def read_model_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise IkdmilError(f"{path}: model file not found; pass a .safetensors file written by ikdmil train/run")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("ikdmil")
    except (SafetensorError, OSError, ValueError) as exc:
        raise IkdmilError(f"{path}: not a safetensors model file ({exc}); pass a model written by ikdmil") from None
    if not raw:
        raise IkdmilError(f"{path}: safetensors file without ikdmil metadata; pass a model written by ikdmil")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise IkdmilError(f"{path}: unsupported model format {meta.get('format')!r}; expected {FORMAT}")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu", expect_backbone: str | None = None):
    """Build the model the file was saved from and load its weights; returns (model, meta)."""
    from ikdmil.models import create_model

    path = Path(path)
    meta = read_model_meta(path)
    if expect_backbone and meta["backbone"] != expect_backbone:
        raise IkdmilError(
            f"{path}: this is a {meta['backbone']!r} model but {expect_backbone!r} was asked for; "
            f"use --backbone {meta['backbone']} or another file"
        )
    model, _ = create_model(meta["backbone"], pretrained="none")
    load_state_checked(model, load_file(str(path)), path)
    return model.to(device), meta


def load_state_checked(model, state: dict, source: str | Path) -> None:
    """load_state_dict with a one-line error naming the file when keys or shapes do not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if bad:
            parts.append(f"{len(bad)} with other shapes (e.g. {bad[0]})")
        raise IkdmilError(
            f"{source}: weights do not fit the {model.name!r} model: {'; '.join(parts)}; "
            "it was saved from another model"
        )
    model.load_state_dict(state)
