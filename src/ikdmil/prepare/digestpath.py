"""Prepare DigestPath 2019 (colonoscopy tissue segmentation) as a patch dataset.

Source: IMAGES_DIR holds the images (any depth; e.g. ``tissue-train-pos-v1/*.jpg`` and
``tissue-train-neg/*.jpg``); MASKS_DIR holds masks named ``NAME_mask.jpg`` (the release's naming,
JPEG) or ``NAME.png``; both may be the same folder (files ending in ``_mask`` are never images).
Masks are read as grey levels and thresholded at 128 (JPEG masks are not exactly 0/255). An image
without a mask has no tumour.

Protocol: each image is cut into `crop_size` (1536) px crops on a grid that covers it (crops are
spread evenly, overlapping a little when the size is not a multiple; an image smaller than a crop
is padded with white glass and an empty mask). A crop is positive when its mask has tumour (fraction
above `min_tumour_fraction`, 0 = any tumour pixel), negative otherwise; masks of positives are saved.
Crops with more than `max_background` (0.8) background (saturation/Otsu tissue detection at the
images' resolution `mpp`, default 0.5 µm/px) are dropped. Images are split into train/val/test by
image (all crops of an image in one split), `val_fraction` / `test_fraction` of the images with
tumour and of those without, deterministically from `seed`.

Resolution: the release's images carry no µm/px. DigestPath 2019's tissue images were scanned at 20x,
so `mpp` defaults to 0.5 µm/px, the nominal 20x value (not a measured one); pass your scanner's value
with ``--mpp`` when you know it. Crops are written at the images' resolution, so every manifest row
gets ``mpp`` = `mpp`, from which training derives the model's µm/px.

Output: ``OUT/{split}/{pos,neg}/NAME_xX_yY.png``, ``OUT/{split}/masks/...png``, ``OUT/manifest.csv``
and ``OUT/digestpath_summary.json``. Resumable (see `ikdmil.prepare.common`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ikdmil.errors import IkdmilError
from ikdmil.io import open_image, read_rgb, write_png
from ikdmil.prepare.common import (
    ResumableOutput,
    crop_positions,
    format_counts,
    natural_key,
    save_patch_image,
    split_by_class,
)
from ikdmil.slide.tissue import TissueMap, TissueParams, detect_tissue, overview_downsample

log = logging.getLogger(__name__)

PREPARER_ID = "ikdmil.prepare.digestpath"
SUMMARY_NAME = "digestpath_summary.json"
_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass
class DigestPathOptions:
    crop_size: int = 1536
    max_background: float = 0.8
    min_tumour_fraction: float = 0.0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0
    mpp: float = 0.5
    image_format: str = "png"
    tissue: TissueParams = field(default_factory=TissueParams)

    def validate(self) -> DigestPathOptions:
        checks = [
            (self.crop_size >= 16, "--patch-size must be at least 16"),
            (0 <= self.max_background <= 1, "--max-background must be in [0, 1]"),
            (0 <= self.min_tumour_fraction < 1, "--min-tumour-fraction must be in [0, 1)"),
            (self.val_fraction >= 0 and self.test_fraction >= 0 and self.val_fraction + self.test_fraction < 1,
             "--val-fraction and --test-fraction must be >= 0 and sum to less than 1"),
            (self.mpp > 0, "--mpp must be positive"),
            (self.image_format in ("png", "jpg"), "--image-format must be png or jpg"),
        ]
        for ok, msg in checks:
            if not ok:
                raise IkdmilError(msg)
        return self


def _files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in _SUFFIXES), key=lambda p: natural_key(p.name))


def _pair(images_dir: Path, masks_dir: Path) -> list[tuple[str, Path, Path | None]]:
    for folder, what in ((images_dir, "images"), (masks_dir, "masks")):
        if not folder.is_dir():
            raise IkdmilError(f"{folder}: {what} folder not found; check the path")
    masks: dict[str, Path] = {}
    same = images_dir.resolve() == masks_dir.resolve()
    for p in _files(masks_dir):
        stem = p.stem
        if stem.lower().endswith("_mask"):
            key = stem[: -len("_mask")]
        elif same:
            continue
        else:
            key = stem
        if key in masks:
            raise IkdmilError(f"{p}: a second mask for {key} ({masks[key].name} and {p.name}); keep one")
        masks[key] = p
    images: dict[str, Path] = {}
    for p in _files(images_dir):
        if p.stem.lower().endswith("_mask") or (not same and p.resolve().parent == masks_dir.resolve()):
            continue
        if p.stem in images:
            raise IkdmilError(f"{p}: image {p.stem} exists twice ({images[p.stem]} and {p}); keep one")
        images[p.stem] = p
    if not images:
        raise IkdmilError(f"{images_dir}: no images ({', '.join(_SUFFIXES)}) found; check the path")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise IkdmilError(f"{masks[orphans[0]]}: mask without an image {orphans[0]} in {images_dir}; "
                          "add the image or remove the mask")
    return [(name, images[name], masks.get(name)) for name in sorted(images, key=natural_key)]


def read_tumour_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    img = open_image(path)
    arr = np.asarray(img.convert("L"))
    if arr.shape != shape:
        raise IkdmilError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} px "
                          f"but its image is {shape[1]}x{shape[0]} px; "
                          "pair each image with its own mask")
    return arr >= 128


def _has_tumour(mask_path: Path | None) -> bool:
    if mask_path is None:
        return False
    img = open_image(mask_path)
    return bool((np.asarray(img.convert("L")) >= 128).any())


def _process(name: str, image: Path, mask_path: Path | None, split: str, opts: DigestPathOptions,
             out: Path) -> list[dict]:
    rgb = read_rgb(image)
    h, w = rgb.shape[:2]
    mask = read_tumour_mask(mask_path, (h, w)) if mask_path is not None else None
    ds = overview_downsample((w, h), (opts.mpp, opts.mpp), opts.tissue.mpp, min_size=256)
    ow, oh = max(1, round(w / ds)), max(1, round(h / ds))
    overview = np.asarray(Image.fromarray(rgb).resize((ow, oh), Image.Resampling.BILINEAR))
    tmask, _ = detect_tissue(overview, opts.mpp * w / ow, opts.tissue)
    tissue = TissueMap(tmask, (w / ow, h / oh), "otsu")
    P = opts.crop_size
    recs = []
    for y in crop_positions(h, P):
        for x in crop_positions(w, P):
            bg = 1.0 - tissue.fraction(x, y, P, P)
            if bg > opts.max_background:
                continue
            crop = np.full((P, P, 3), 255, np.uint8)
            part = rgb[y:y + P, x:x + P]
            crop[:part.shape[0], :part.shape[1]] = part
            m = np.zeros((P, P), bool)
            if mask is not None:
                mp = mask[y:y + P, x:x + P]
                m[:mp.shape[0], :mp.shape[1]] = mp
            tf = float(m.mean())
            label = int(tf > opts.min_tumour_fraction)
            stem = f"{name}_x{x}_y{y}"
            image_rel = f"{split}/{'pos' if label else 'neg'}/{stem}.{opts.image_format}"
            save_patch_image(out / image_rel, crop, opts.image_format)
            mask_rel = ""
            if label:
                mask_rel = f"{split}/masks/{stem}.png"
                write_png(out / mask_rel, m)
            recs.append({"image": image_rel, "label": label, "mask": mask_rel, "split": split, "mpp": opts.mpp,
                         "source": name,
                         "x": x, "y": y, "background": round(bg, 4), "tumour_fraction": round(tf, 4)})
    return recs


def prepare_digestpath(images_dir: str | os.PathLike, masks_dir: str | os.PathLike, out: str | os.PathLike,
                       options: DigestPathOptions | None = None, progress: bool = True) -> Path:
    """Build the DigestPath crop dataset (see the module docstring); resumable image by image.

    Args:
        images_dir: the colonoscopy tissue images (positives and negatives).
        masks_dir: the pixel masks of the positives (``NAME_mask.jpg``), the source of crop labels.
        out: output folder (the ikdmil layout plus ``manifest.csv`` and a summary JSON).
        options: crop size, µm/px, counts, tissue detection (`DigestPathOptions`).
        progress: show progress bars.

    Returns:
        The path of ``OUT/manifest.csv``.

    Example:
        >>> prepare_digestpath("dp/tissue-train-pos", "dp/masks", "data/digestpath")
    """
    opts = (options or DigestPathOptions()).validate()
    images_dir, masks_dir = Path(images_dir).absolute(), Path(masks_dir).absolute()
    items = _pair(images_dir, masks_dir)
    store = ResumableOutput(out, PREPARER_ID, dataclasses.asdict(opts), [images_dir, masks_dir], SUMMARY_NAME)
    tumour = {}
    for name, _, mask in items:
        cached = store.load("scan", name)
        if cached is None:
            cached = {"tumour": _has_tumour(mask)}
            store.save("scan", name, cached)
        tumour[name] = cached["tumour"]
    splits = split_by_class([(n, tumour[n]) for n, _, _ in items], opts.val_fraction, opts.test_fraction, opts.seed)
    records: list[dict] = []
    for name, image, mask in tqdm(items, desc="DigestPath", unit="img", disable=not progress):
        done = store.done(name)
        if done is None:
            for sub in ("pos", "neg", "masks"):
                (store.out / splits[name] / sub).mkdir(parents=True, exist_ok=True)
            done = _process(name, image, mask, splits[name], opts, store.out)
            store.mark_done(name, done)
        records.extend(done)
    summary = {
        "source": {"images": str(images_dir), "masks": str(masks_dir)},
        "images": {split: sorted((n for n in splits if splits[n] == split), key=natural_key)
                   for split in ("train", "val", "test")},
        "images_with_tumour": sorted((n for n in tumour if tumour[n]), key=natural_key),
        "protocol": (f"{opts.crop_size} px crops covering each image; positive when the crop's mask has tumour "
                     f"(fraction > {opts.min_tumour_fraction}); drop background > {opts.max_background}; "
                     f"split by image (val {opts.val_fraction}, test {opts.test_fraction}, seed {opts.seed})"),
    }
    manifest = store.finish(records, summary)
    log.info("digestpath: %s", format_counts(records))
    return manifest
