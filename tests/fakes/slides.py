"""Tiny fake whole-slide data in the real formats, written offline in milliseconds (torchgeo style).

- `write_slide`: a tiled, deflate-compressed, pyramidal TIFF (consecutive IFDs, subfiletype=1) with
  resolution tags, which OpenSlide opens as a generic-tiff slide with levels and mpp;
- `synth_slide` / `painted_slide`: level-0 images made of cells (synthetic H&E from
  `ikdmil.prepare.synth`, or flat "tumour purple" / "tissue pink" paint) on white glass, with the exact
  tumour mask;
- `write_asap_xml`: ASAP / Camelyon16 annotation XML (polygons in groups, e.g. "_0", "_1", "_2");
- `make_fake_camelyon16`, `make_fake_digestpath`: whole source folders for the preparers;
- `dark_detector_model`: a model file whose "backbone" marks dark (tumour-purple) pixels as tumour,
  so end-to-end tests know where the prediction must land (`weight=float("nan")`: a diverged model);
- `png_header`: a PNG of a few bytes whose header claims any size (a decompression bomb), with or
  without (truncated) pixel data.
"""

from __future__ import annotations

import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ikdmil.prepare.synth import synth_image
from ikdmil.slide.tiff import write_rgb_tiff

WHITE = (242, 242, 240)
PINK = (225, 160, 200)
PURPLE = (95, 45, 130)


def write_slide(path, image: np.ndarray, mpp: float | None = 0.25, tile: int = 64, levels: int = 3) -> Path:
    """A tiled pyramidal TIFF (level k = 2**k downsample) with mpp in px/cm tags (None: no resolution)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_rgb_tiff(path, image, None if mpp is None else (mpp, mpp), tile=tile, levels=levels)
    return path


def _glass(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return np.clip(np.array(WHITE) + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)


def synth_slide(rng: np.random.Generator, rows: int, cols: int, cell: int, tumour: set = frozenset(),
                glass: set = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """(image, tumour mask): a rows x cols grid of synthetic H&E cells; `tumour` cells are all tumour,
    `glass` cells are empty glass, the rest tumour-free tissue."""
    img = np.empty((rows * cell, cols * cell, 3), np.uint8)
    mask = np.zeros((rows * cell, cols * cell), bool)
    for r in range(rows):
        for c in range(cols):
            sl = np.s_[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            if (r, c) in glass:
                img[sl] = _glass(rng, cell, cell)
                continue
            im, m = synth_image(rng, cell, 1.0 if (r, c) in tumour else 0.0)
            img[sl], mask[sl] = im, m
    return img, mask


def painted_slide(rng: np.random.Generator, size: tuple[int, int], tissue: list[tuple[int, int, int, int]],
                  tumour: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(image, tumour mask) of size (w, h): glass, pink tissue rectangles (x, y, w, h), purple tumour rectangles."""
    w, h = size
    img = _glass(rng, h, w)
    mask = np.zeros((h, w), bool)
    for x, y, rw, rh in tissue:
        img[y:y + rh, x:x + rw] = np.clip(np.array(PINK) + rng.normal(0, 6, (rh, rw, 3)), 0, 255)
    for x, y, rw, rh in tumour:
        img[y:y + rh, x:x + rw] = np.clip(np.array(PURPLE) + rng.normal(0, 6, (rh, rw, 3)), 0, 255)
        mask[y:y + rh, x:x + rw] = True
    return img, mask


def write_asap_xml(path, polygons: list[list[tuple[float, float]]], groups: list[str] | None = None) -> Path:
    """ASAP annotation XML as in Camelyon16: one <Annotation Type="Polygon"> per polygon."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = groups or ["_0"] * len(polygons)
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    for i, (poly, group) in enumerate(zip(polygons, groups)):
        lines.append(f'\t\t<Annotation Name="Annotation {i}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        lines.append("\t\t\t<Coordinates>")
        for k, (x, y) in enumerate(poly):
            lines.append(f'\t\t\t\t<Coordinate Order="{k}" X="{x}" Y="{y}" />')
        lines += ["\t\t\t</Coordinates>", "\t\t</Annotation>"]
    lines += ["\t</Annotations>", "\t<AnnotationGroups>"]
    for g in dict.fromkeys(groups):
        lines.append(f'\t\t<Group Name="{g}" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>')
    lines += ["\t</AnnotationGroups>", "</ASAP_Annotations>"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _rect(x, y, w, h):
    return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]


def make_fake_camelyon16(root, cell: int = 64, mpp: float = 0.25, seed: int = 0) -> dict:
    """SLIDES (training/tumor, training/normal, testing/images), ANNOTATIONS (*.xml) and reference.csv.

    Slides are 8x8 cells of `cell` px at level 0 (mpp 0.25, levels 1 and 2 at 0.5 and 1.0 µm/px);
    the top row is glass. Tumour slides have a rectangular tumour of 3x2 cells with an "_2" exclusion
    hole of one cell in it. Returns {"slides": dir, "annotations": dir, "tumour": {name: (x, y, w, h)}}.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    slides, annos = root / "slides", root / "annotations"
    tumours: dict[str, tuple] = {}
    exclusions: dict[str, tuple] = {}
    layout = {
        "training/tumor/tumor_001": True, "training/tumor/tumor_002": True, "training/tumor/tumor_003": True,
        "training/normal/normal_001": False, "training/normal/normal_002": False,
        "training/normal/normal_003": False, "testing/images/test_001": True, "testing/images/test_002": False,
    }
    glass = {(0, c) for c in range(8)}
    for rel, is_tumour in layout.items():
        name = Path(rel).name
        tcells = set()
        if is_tumour:
            r0, c0 = 2 + int(rng.integers(0, 3)), 1 + int(rng.integers(0, 3))
            tcells = {(r0 + dr, c0 + dc) for dr in range(2) for dc in range(3)}
            tumours[name] = (c0 * cell, r0 * cell, 3 * cell, 2 * cell)
            exclusions[name] = ((c0 + 1) * cell + cell // 4, r0 * cell + cell // 4, cell // 2, cell // 2)
        img, _ = synth_slide(rng, 8, 8, cell, tcells, glass)
        write_slide(slides / (rel + ".tif"), img, mpp, tile=64, levels=3)
        if is_tumour:
            x, y, w, h = tumours[name]
            ex = exclusions[name]
            write_asap_xml(annos / f"{name}.xml", [_rect(x, y, w, h), _rect(*ex)], ["_0", "_2"])
    (slides / "testing" / "reference.csv").write_text("Test_001,Tumor,Macro,Primary\nTest_002,Normal,,\n")
    return {"slides": slides, "annotations": annos, "tumour": tumours, "exclusion": exclusions}


def make_fake_digestpath(root, n_pos: int = 4, n_neg: int = 3, size: tuple[int, int] = (160, 120),
                         seed: int = 0) -> dict:
    """images/NAME.jpg for positives and negatives, masks/NAME_mask.jpg (JPEG, like DigestPath) for positives."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    w, h = size
    masks = {}
    for i in range(n_pos + n_neg):
        name = f"{'pos' if i < n_pos else 'neg'}-{i:02d}"
        img = np.empty((h, w, 3), np.uint8)
        img[:] = synth_image(rng, max(w, h), 0.0)[0][:h, :w]
        mask = np.zeros((h, w), bool)
        if i < n_pos:
            x0 = int(rng.integers(0, w // 2))
            mask[h // 4: h // 4 + h // 3, x0:x0 + w // 3] = True
            img[mask] = synth_image(rng, max(w, h), 1.0)[0][:h, :w][mask]
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{name}_mask.jpg", quality=90)
        Image.fromarray(img).save(root / "images" / f"{name}.jpg", quality=90)
        masks[name] = mask
    return {"images": root / "images", "masks": root / "masks", "truth": masks}


# ----------------------------------------------------------------------------------------- test models


class _Darkness(nn.Module):
    """A parameter-free 'backbone': local darkness of the (de-normalised) image, one side output."""

    out_channels = [1]

    def forward(self, x):
        mean = torch.tensor((0.485, 0.456, 0.406), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        rgb = x * std + mean
        dark = 1 - rgb.mean(1, keepdim=True)
        return [nn.functional.avg_pool2d(dark, 5, 1, 2, count_include_pad=False)]


def _register_dark():
    from ikdmil.models import available_backbones, register_backbone

    if "test-dark" not in available_backbones():
        register_backbone("test-dark")(lambda pretrained=None: (_Darkness(), "no weights"))


@contextmanager
def dark_backbone():
    """Register the "test-dark" backbone for the duration of a block (tests over the registry never see it)."""
    from ikdmil.models import registry

    saved = dict(registry._REGISTRY)
    _register_dark()
    try:
        yield
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


def dark_detector_model(path, input_size=64, weight: float = 30.0, **meta) -> Path:
    """A model file: tumour probability = sigmoid(30 * (darkness - 0.45)); purple paint is dark, pink is not.

    `weight` replaces the 30 (NaN or inf: a model whose training diverged); `input_size` and `meta`
    go into the file's metadata as given (any value, for tests of damaged metadata).
    Loading it needs the "test-dark" backbone: use it inside `with dark_backbone():`.
    """
    from ikdmil.models import create_model
    from ikdmil.models.checkpoint import save_model

    _register_dark()
    model, _ = create_model("test-dark", pretrained="none")
    with torch.no_grad():
        model.side_heads[0].weight.fill_(weight)
        model.side_heads[0].bias.fill_(-30.0 * 0.45)
    return save_model(model, path, input_size=input_size, **meta)


def vgg_model(path, input_size: int = 64, seed: int = 0, gain: float = 8.0) -> Path:
    """A random-init vgg16 MIL model whose side logits are scaled up, so its maps vary with the image."""
    return random_model(path, "vgg16", input_size, seed, gain)


def random_model(path, backbone: str, input_size: int = 64, seed: int = 0, gain: float = 8.0) -> Path:
    """A random-init MIL model of any registered backbone, side logits scaled by `gain` (maps that vary)."""
    from ikdmil.models import create_model
    from ikdmil.models.checkpoint import save_model

    torch.manual_seed(seed)
    model, _ = create_model(backbone, pretrained="none")
    with torch.no_grad():
        for head in model.side_heads:
            head.weight.mul_(gain)
    return save_model(model, path, input_size=input_size)


def png_header(path, width: int, height: int, pixels: bytes | None = None) -> Path:
    """An 8-bit RGB PNG whose header says `width` x `height`; `pixels`: the (compressed) IDAT payload,
    None for none at all (header only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + (chunk(b"IDAT", pixels) if pixels is not None else b"") + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path
