"""Preprocessing cache and the training Dataset.

Every image is decoded and rescaled once, isotropically, to the model's scale (`ikdmil.data.scale`:
never squeezed to a square) into one uint8 array file per (samples, input size, scale), keyed by the
samples' content (paths, labels, mpp, sizes, mtimes) and the scale, so epochs never decode PNG/JPEG
again and a changed dataset or scale never reuses a stale cache.

Layout: the rescaled images of a split lie on one canvas (N, H, W, 3), H and W the largest rescaled
height and width but at least `size`, each image at the top-left and `sizes[i]` = its (h, w); the
rest is white (255), with mask 0. Training takes `size` crops inside an image
(`ikdmil.engine.loop.Cropper`), so white padding enters a crop only where the image itself is
shorter than `size` in that direction; evaluation scores `[:h, :w]` only. Masks are rescaled to the
same grid by nearest neighbour. Images of very different sizes share the largest one's canvas: cut
such data into patches first (the slide preparers do). Arrays are memory-mapped (also while they
are built), so a dataset larger than RAM still works. An entry is built in a hidden temporary folder
and renamed into place only once complete: an unreadable image, a bad mask or an interruption leaves
no entry behind.
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
from ikdmil.data.scale import Scale, choose_scale, image_size, scaled_shape
from ikdmil.errors import IkdmilError
from ikdmil.io import make_temp_dir, read_mask, read_rgb, remove_stale_temps


def default_cache_dir() -> Path:
    return Path(os.environ.get("IKDMIL_CACHE", Path.home() / ".cache" / "ikdmil"))


def resize_rgb(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased) resize of a uint8 RGB image to `size` = (h, w), or size x size."""
    h, w = (size, size) if isinstance(size, int) else size
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None))


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to (h, w): the truth stays on the image's grid, unblurred."""
    if mask.shape[:2] == shape:
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(shape[::-1], Image.Resampling.NEAREST)) > 0


def load_sample(sample: Sample, factor: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decode, check and rescale one sample by `factor` in both axes: (uint8 h,w,3 image, bool h,w mask,
    has_mask)."""
    img = read_rgb(sample.image)
    if sample.mask is not None:
        mask = read_mask(sample.mask, expect_shape=img.shape[:2])
        has_mask = True
    else:
        mask = np.zeros(img.shape[:2], dtype=bool)
        has_mask = sample.label == 0  # a negative's truth is empty by definition
    if sample.label == 0:
        mask = np.zeros_like(mask)
    shape = scaled_shape(img.shape[:2], factor)
    return resize_rgb(img, shape), _resize_mask(mask, shape), has_mask


@dataclass
class CachedArrays:
    """One split at the model's scale on a common canvas (see the module docstring)."""

    images: np.ndarray  # (N,H,W,3) uint8, memory-mapped; H, W >= tile
    masks: np.ndarray  # (N,H,W) bool
    labels: np.ndarray  # (N,) int64
    has_mask: np.ndarray  # (N,) bool
    sizes: np.ndarray | None = None  # (N,2) int64: each image's (h, w) on the canvas; None = the whole canvas
    tile: int = 0  # the model's input size (crop / tile side); 0 = the canvas's short side

    def __post_init__(self):
        if self.sizes is None:
            self.sizes = np.tile(np.array(self.images.shape[1:3], np.int64), (len(self.images), 1))
        if not self.tile:
            self.tile = int(min(self.images.shape[1:3]))

    def valid(self, i: int, a: np.ndarray) -> np.ndarray:
        """The image part `[:h, :w]` of image i's canvas-sized array `a` (image, mask or map)."""
        h, w = self.sizes[i]
        return a[:h, :w]


CACHE_FILES = ("images.npy", "masks.npy", "labels.npy", "has_mask.npy", "sizes.npy", "meta.json")


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CACHE_FILES)


def cache_key(samples: list[Sample], size: int, scale: Scale) -> str:
    """The cache entry's name: the samples' content, the input size and the scale."""
    return f"{samples_digest(samples)}-{size}-{scale.key()}"


def build_cache(
    samples: list[Sample], size: int, cache_dir: str | os.PathLike | None = None, progress: bool = True,
    desc: str = "caching", scale: Scale | None = None,
) -> CachedArrays:
    """Decode + rescale `samples` once (threads) into `cache_dir/<cache_key>/`; reuse when present.

    `scale`: the model's (`ikdmil.data.scale`); default `choose_scale(samples, size)`. The entry is built
    in a hidden temporary folder next to it and renamed into place only when every image has decoded
    and every file is written, so a bad image (or an interruption) leaves no entry.
    """
    scale = scale or choose_scale(samples, size)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache_dir / cache_key(samples, size, scale)
    if not _complete(folder):
        _build_entry(samples, size, scale, cache_dir, folder, progress, desc)
    return CachedArrays(
        images=np.load(folder / "images.npy", mmap_mode="r"),
        masks=np.load(folder / "masks.npy", mmap_mode="r"),
        labels=np.load(folder / "labels.npy"),
        has_mask=np.load(folder / "has_mask.npy"),
        sizes=np.load(folder / "sizes.npy"),
        tile=size,
    )


def _write_error(where: Path, exc: OSError) -> IkdmilError:
    return IkdmilError(
        f"{where}: cannot write the preprocessing cache ({' '.join(str(exc).split())}); free disk space or "
        "pass a writable --cache-dir"
    )


def _load_checked(sample: Sample, factor: float):
    try:
        return load_sample(sample, factor)
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


def canvas_shape(samples: list[Sample], size: int, scale: Scale) -> tuple[np.ndarray, tuple[int, int]]:
    """(sizes (N,2) of the rescaled images, canvas (H, W)) from the images' headers."""
    sizes = np.array([scaled_shape(image_size(s), scale.of(s)) for s in samples], np.int64).reshape(-1, 2)
    high = sizes.max(0) if len(sizes) else np.zeros(2, np.int64)
    return sizes, (max(size, int(high[0])), max(size, int(high[1])))


def _build_entry(samples: list[Sample], size: int, scale: Scale, cache_dir: Path, folder: Path, progress: bool,
                 desc: str) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(cache_dir)
        tmp = make_temp_dir(folder)
    except OSError as exc:
        raise _write_error(cache_dir, exc) from None
    try:
        n = len(samples)
        sizes, (height, width) = canvas_shape(samples, size, scale)
        images = _allocate(tmp / "images.npy", np.uint8, (n, height, width, 3))
        masks = _allocate(tmp / "masks.npy", np.bool_, (n, height, width))
        has_mask = np.empty(n, bool)
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            results = pool.map(lambda s: _load_checked(s, scale.of(s)), samples)
            for i, (img, mask, hm) in enumerate(tqdm(results, total=n, desc=desc, disable=not progress, leave=False)):
                h, w = img.shape[:2]
                if (h, w) != tuple(sizes[i]):  # the header lied about the size (e.g. EXIF-rotated JPEG)
                    raise IkdmilError(f"{samples[i].image}: decodes to {w}x{h} px at the model's scale, not the "
                                      f"{sizes[i][1]}x{sizes[i][0]} its header gives; re-export the image")
                images[i] = 255  # white padding: glass / background
                images[i, :h, :w], masks[i, :h, :w], has_mask[i] = img, mask, hm
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
        np.save(tmp / "sizes.npy", sizes)
        meta = {"n": n, "size": size, "scale": scale.meta(), "canvas": [height, width],
                "images": [str(s.image) for s in samples]}
        (tmp / "meta.json").write_text(json.dumps(meta))
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
    """Items are (uint8 3xHxW canvas image, label, index); cropping, normalisation and augmentation
    happen after batching (`ikdmil.engine.loop.run_epoch`)."""

    def __init__(self, arrays: CachedArrays):
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays.labels)

    def __getitem__(self, i: int):
        img = torch.from_numpy(np.array(self.arrays.images[i])).permute(2, 0, 1)  # copy: the memmap is read-only
        return img, int(self.arrays.labels[i]), i
