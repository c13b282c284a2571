"""Preprocessing cache and the training Dataset.

Every image is decoded and resized once into one uint8 array file per (samples, size), keyed by the
samples' content (paths, labels, sizes, mtimes), so epochs never decode PNG/JPEG again and a changed
dataset never reuses a stale cache. Arrays are memory-mapped, so a dataset larger than RAM still works.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ikdmil.data.io import atomic_path, read_mask, read_rgb
from ikdmil.data.manifest import Sample, samples_digest


def default_cache_dir() -> Path:
    return Path(os.environ.get("IKDMIL_CACHE", Path.home() / ".cache" / "ikdmil"))


def _resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    if mask.shape[:2] == (size, size):
        return mask
    # area-weighted resize then 0.5 threshold: keeps thin structures better than nearest neighbour
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small) >= 128


def load_sample(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decode, check and resize one sample: (uint8 S,S,3 image, bool S,S mask, has_mask)."""
    img = read_rgb(sample.image)
    if sample.mask is not None:
        mask = read_mask(sample.mask, expect_shape=img.shape[:2])
        has_mask = True
    else:
        mask = np.zeros(img.shape[:2], dtype=bool)
        has_mask = sample.label == 0  # a negative's truth is empty by definition
    if sample.label == 0:
        mask = np.zeros_like(mask)
    return _resize_rgb(img, size), _resize_mask(mask, size), has_mask


@dataclass
class CachedArrays:
    images: np.ndarray  # (N,S,S,3) uint8, memory-mapped
    masks: np.ndarray  # (N,S,S) bool
    labels: np.ndarray  # (N,) int64
    has_mask: np.ndarray  # (N,) bool


def build_cache(
    samples: list[Sample], size: int, cache_dir: str | os.PathLike | None = None, progress: bool = True,
    desc: str = "caching",
) -> CachedArrays:
    """Decode + resize `samples` once (threads) into `cache_dir/<digest>-<size>/`; reuse when present."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = f"{samples_digest(samples)}-{size}"
    folder = cache_dir / key
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        n = len(samples)
        images = np.empty((n, size, size, 3), np.uint8)
        masks = np.empty((n, size, size), bool)
        has_mask = np.empty(n, bool)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(lambda s: load_sample(s, size), samples)
            for i, (img, mask, hm) in enumerate(tqdm(results, total=n, desc=desc, disable=not progress, leave=False)):
                images[i], masks[i], has_mask[i] = img, mask, hm
        labels = np.array([s.label for s in samples], np.int64)
        for name, arr in (("images", images), ("masks", masks), ("labels", labels), ("has_mask", has_mask)):
            with atomic_path(folder / f"{name}.npy") as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps({"n": n, "size": size, "images": [str(s.image) for s in samples]}))
    return CachedArrays(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        masks=np.load(folder / "masks.npy", mmap_mode="r"),
        labels=np.load(folder / "labels.npy"),
        has_mask=np.load(folder / "has_mask.npy"),
    )


class PatchDataset(torch.utils.data.Dataset):
    """Items are (uint8 3xSxS image, label, index); normalisation/augmentation happen on the device."""

    def __init__(self, arrays: CachedArrays):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays.labels)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.array(self.arrays.images[i])).permute(2, 0, 1)  # copy: the memmap is read-only
        return img, int(self.arrays.labels[i]), i
