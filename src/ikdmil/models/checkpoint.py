"""Model files: safetensors weights plus metadata that says which model they belong to.

A model file written here loads without running any pickled code, and loading a file made for
another backbone (or not made by ikdmil at all) fails with a message instead of a shape traceback.

Metadata (`ikdmil` key, JSON): `format`, `backbone`, `head` (which network is built on the
backbone: "mil" = `MILSegmenter`, side heads + fusion; "segnet" = `ikdmil.models.segnet.SegNet`,
with its `decoder_width`; files without `head` are MIL models), `side_taps` where the backbone has
them, and what the writer adds: `method` (the training method, e.g. ikd, oeem), `role`,
`val_score`, `input_size`, `mpp`, `stain` (the training images' stain statistics, `ikdmil.stain`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ikdmil.errors import IkdmilError
from ikdmil.io import atomic_path, one_line

FORMAT = "ikdmil-model-1"


def save_model(model, path: str | Path, **meta) -> Path:
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"format": FORMAT, "backbone": model.name, **meta, "head": getattr(model, "head", "mil")}
    info.update(getattr(model, "file_meta", {}))  # what rebuilds the network (e.g. decoder_width)
    if getattr(model, "side_taps", None):  # rebuilt by load_model (files without it: the backbone's default)
        info["side_taps"] = model.side_taps
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
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise IkdmilError(
            f"{path}: not a safetensors model file ({one_line(exc)}); pass a model.safetensors written by "
            "ikdmil train/run"
        ) from None
    if not raw:
        raise IkdmilError(
            f"{path}: safetensors file without ikdmil metadata (not written by ikdmil); pass a model.safetensors "
            "written by ikdmil train/run"
        )
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("backbone"), str):
        raise IkdmilError(
            f"{path}: damaged ikdmil metadata in the model file; pass a model.safetensors written by ikdmil train/run"
        )
    if meta.get("format") != FORMAT:
        raise IkdmilError(
            f"{path}: unsupported model format {meta.get('format')!r} (this ikdmil reads {FORMAT}); use the ikdmil "
            "version that wrote it, or retrain"
        )
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu", expect_backbone: str | None = None):
    """Build the model a `.safetensors` file was saved from and load its weights.

    Args:
        path: a model file written by ``ikdmil train/run`` (or `save_model`).
        device: where to put the model.
        expect_backbone: refuse (one-line error) a file made for another backbone.

    Returns:
        ``(model, meta)``: the model with the file's weights, and the metadata stored with it
        (``backbone``, ``input_size``, ``mpp`` when known, ``role``, ``val_score``, ...).

    Example:
        >>> model, meta = load_model("runs/glas/model.safetensors")
        >>> meta["input_size"]
        256
    """
    from ikdmil.models import available_backbones

    path = Path(path)
    meta = read_model_meta(path)
    if expect_backbone and meta["backbone"] != expect_backbone:
        raise IkdmilError(
            f"{path}: this is a {meta['backbone']!r} model but {expect_backbone!r} was asked for; "
            f"use --backbone {meta['backbone']} or another file"
        )
    if meta["backbone"] not in available_backbones():
        raise IkdmilError(
            f"{path}: made for backbone {meta['backbone']!r}, which this ikdmil does not have "
            f"(it has: {', '.join(available_backbones())}); use a model trained with one of those"
        )
    model = _build(meta, path)
    if meta.get("side_taps") and model.side_taps is not None:
        try:
            model.set_side_taps(meta["side_taps"])
        except ValueError as exc:
            raise IkdmilError(f"{path}: {exc}; the file is damaged or from a newer ikdmil") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise IkdmilError(
            f"{path}: cannot read the weights ({one_line(exc)}); the file is damaged: copy it again or retrain"
        ) from None
    load_state_checked(model, state, path)
    return model.to(device), meta


def _build(meta: dict, path: Path):
    """The untrained network the metadata describes (`head`: mil, the default, or segnet)."""
    from ikdmil.models import create_model
    from ikdmil.models.segnet import HEAD as SEGNET
    from ikdmil.models.segnet import create_segnet

    head = meta.get("head", "mil")
    if head == "mil":
        return create_model(meta["backbone"], pretrained="none")[0]
    if head == SEGNET:
        width = meta.get("decoder_width")
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= 4096:
            raise IkdmilError(f"{path}: damaged metadata (decoder_width {width!r}); copy the file again or retrain")
        return create_segnet(meta["backbone"], pretrained="none", width=width)[0]
    raise IkdmilError(f"{path}: a {head!r} network, which this ikdmil cannot build (it has: mil, {SEGNET}); use the "
                      "ikdmil version that wrote it, or retrain")


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
            f"{source}: weights do not fit the {model.name!r} model ({', '.join(parts)}): it was saved from "
            "another model or version; use a file written for this model by ikdmil train/run, or retrain"
        )
    model.load_state_dict(state)
