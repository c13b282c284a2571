"""Preprocessing cache and the training Dataset.

Every image is decoded and resized once into one uint8 array file per (samples, size), keyed by the
samples' content (paths, labels, sizes, mtimes), so epochs never decode PNG/JPEG again and a changed
dataset never reuses a stale cache. Arrays are memory-mapped (also while they are built), so a dataset
larger than RAM still works. An entry is built in a hidden temporary folder and renamed into place only
once complete: an unreadable image, a bad mask or an interruption leaves no entry behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ikdmil.data.manifest import Sample, samples_digest
from ikdmil.errors import IkdmilError
from ikdmil.io import make_temp_dir, read_mask, read_rgb, remove_stale_temps


def default_cache_dir() -> Path:
    return Path(os.environ.get("IKDMIL_CACHE", Path.home() / ".cache" / "ikdmil"))


def resize_rgb(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a uint8 RGB image to size x size (the model's input)."""
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
    return resize_rgb(img, size), _resize_mask(mask, size), has_mask


@dataclass
class CachedArrays:
    images: np.ndarray  # (N,S,S,3) uint8, memory-mapped
    masks: np.ndarray  # (N,S,S) bool
    labels: np.ndarray  # (N,) int64
    has_mask: np.ndarray  # (N,) bool


CACHE_FILES = ("images.npy", "masks.npy", "labels.npy", "has_mask.npy", "meta.json")


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CACHE_FILES)


def build_cache(
    samples: list[Sample], size: int, cache_dir: str | os.PathLike | None = None, progress: bool = True,
    desc: str = "caching",
) -> CachedArrays:
    """Decode + resize `samples` once (threads) into `cache_dir/<digest>-<size>/`; reuse when present.

    The entry is built in a hidden temporary folder next to it and renamed into place only when every
    image has decoded and every file is written, so a bad image (or an interruption) leaves no entry.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = f"{samples_digest(samples)}-{size}"
    folder = cache_dir / key
    if not _complete(folder):
        _build_entry(samples, size, cache_dir, folder, progress, desc)
    return CachedArrays(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        masks=np.load(folder / "masks.npy", mmap_mode="r"),
        labels=np.load(folder / "labels.npy"),
        has_mask=np.load(folder / "has_mask.npy"),
    )


def _write_error(where: Path, exc: OSError) -> IkdmilError:
    return IkdmilError(
        f"{where}: cannot write the preprocessing cache ({' '.join(str(exc).split())}); free disk space or "
        "pass a writable --cache-dir"
    )


def _load_checked(sample: Sample, size: int):
    try:
        return load_sample(sample, size)
    except OSError as exc:  # not a cache-write problem: name the image
        raise IkdmilError(
            f"{sample.image}: cannot read ({' '.join(str(exc).split())}); check the file or remove it from the dataset"
        ) from None


def _allocate(path: Path, dtype, shape: tuple) -> np.ndarray:
    """A writable array stored in `path` (.npy): memory-mapped, so datasets larger than RAM work.

    The file's blocks are reserved up front where the OS can, so a full disk is an OSError here
    rather than a crash (SIGBUS) while writing through the map.
    """
    if not shape[0]:
        return np.empty(shape, dtype)  # saved with np.save (an empty file cannot be mapped)
    arr = np.lib.format.open_memmap(path, "w+", dtype, shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as fh:
            try:
                os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
    return arr


def _build_entry(samples: list[Sample], size: int, cache_dir: Path, folder: Path, progress: bool, desc: str) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cache_dir)
        tmp = make_temp_dir(folder)
    except OSError as exc:
        raise _write_error(cache_dir, exc) from None
    try:
        n = len(samples)
        images = _allocate(tmp / "images.npy", np.uint8, (n, size, size, 3))
        masks = _allocate(tmp / "masks.npy", np.bool_, (n, size, size))
        has_mask = np.empty(n, bool)
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            results = pool.map(lambda s: _load_checked(s, size), samples)
            for i, (img, mask, hm) in enumerate(tqdm(results, total=n, desc=desc, disable=not progress, leave=False)):
                images[i], masks[i], has_mask[i] = img, mask, hm
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # first bad image: stop, don't decode the rest
        for name, arr in (("images", images), ("masks", masks)):
            if isinstance(arr, np.memmap):
                arr.flush()
            else:
                np.save(tmp / f"{name}.npy", arr)
        del images, masks
        np.save(tmp / "labels.npy", np.array([s.label for s in samples], np.int64))
        np.save(tmp / "has_mask.npy", has_mask)
        (tmp / "meta.json").write_text(json.dumps({"n": n, "size": size, "images": [str(s.image) for s in samples]}))
        if folder.exists() and not _complete(folder):
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete entry left by an older version
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _complete(folder):  # else another process finished the same entry first: use it
                raise
    except OSError as exc:
        raise _write_error(folder, exc) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class PatchDataset(torch.utils.data.Dataset):
    """Items are (uint8 3xSxS image, label, index); normalisation/augmentation happen on the device."""

    def __init__(self, arrays: CachedArrays):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays.labels)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.array(self.arrays.images[i])).permute(2, 0, 1)  # copy: the memmap is read-only
        return img, int(self.arrays.labels[i]), i
