"""Pyramidal TIFF output: consecutive-IFD pyramids that OpenSlide and QuPath read as levels.

A SubIFD pyramid is *not* read by OpenSlide as levels, so reduced images are written as further IFDs with
``subfiletype=1``. Every level carries its resolution in px/cm, so readers report µm/px.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ikdmil.io import atomic_path


def _pyramid_shapes(h: int, w: int, min_size: int) -> list[tuple[int, int]]:
    shapes = [(h, w)]
    while max(shapes[-1]) > min_size:
        ph, pw = shapes[-1]
        shapes.append(((ph + 1) // 2, (pw + 1) // 2))
    return shapes


def _downsample2(block: np.ndarray, reduce: str) -> np.ndarray:
    """2x2 reduction of a uint8 (h, w) block; odd edges are replicated."""
    h, w = block.shape
    if h % 2 or w % 2:
        block = np.pad(block, ((0, h % 2), (0, w % 2)), mode="edge")
    b = block.reshape(block.shape[0] // 2, 2, block.shape[1] // 2, 2)
    if reduce == "max":
        return b.max(axis=(1, 3))
    return ((b.astype(np.uint16).sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def write_pyramid_tiff(path: str | os.PathLike, level0: np.ndarray, mpp: tuple[float, float], tile: int = 256,
                       reduce: str = "mean", min_size: int = 256, scratch: Path | None = None,
                       band: int = 256) -> list[tuple[int, int]]:
    """Write a single-channel uint8 array (may be a memmap) as a tiled, deflate-compressed pyramidal TIFF.

    Levels are consecutive IFDs (level 0 full size, then subfiletype=1 reduced images halving each time,
    down to `min_size` px), which is what OpenSlide and QuPath read as a pyramid. Every level carries its
    resolution in px/cm, so OpenSlide reports ``openslide.mpp-x/y`` = `mpp` at level 0. Reduced levels
    are computed band by band into memmaps under `scratch`, so memory stays O(band x width).
    Returns the (height, width) of each level.
    """
    import tifffile

    path = Path(path)
    shapes = _pyramid_shapes(*level0.shape[:2], min_size)
    scratch = Path(scratch or path.parent)
    levels = [level0]
    tmp_files = []
    try:
        for k in range(1, len(shapes)):
            prev = levels[-1]
            fn = scratch / f".{path.stem}.level{k}.u8"
            tmp_files.append(fn)
            arr = np.memmap(fn, np.uint8, "w+", shape=shapes[k])
            for y in range(0, prev.shape[0], 2 * band):
                arr[y // 2:(y + 2 * band + 1) // 2] = _downsample2(np.asarray(prev[y:y + 2 * band]), reduce)
            arr.flush()
            levels.append(arr)
        with atomic_path(path) as tmp:
            big = level0.size > 2**31
            with tifffile.TiffWriter(tmp, bigtiff=big) as tw:
                for k, arr in enumerate(levels):
                    ds = 2**k
                    tw.write(
                        _tiles(arr, tile), shape=arr.shape, dtype=np.uint8, tile=(tile, tile),
                        photometric="minisblack", compression="zlib", subfiletype=1 if k else 0,
                        resolution=(1e4 / (mpp[0] * ds), 1e4 / (mpp[1] * ds)), resolutionunit="CENTIMETER",
                        metadata=None, software="ikdmil",
                    )
    finally:
        for arr in levels[1:]:
            del arr
        levels = None
        for fn in tmp_files:
            try:
                fn.unlink()
            except OSError:
                pass
    return shapes


def _tiles(arr: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    h, w = arr.shape[:2]
    for y in range(0, h, tile):
        rows = np.asarray(arr[y:y + tile])
        for x in range(0, w, tile):
            t = rows[:, x:x + tile]
            if t.shape != (tile, tile):
                t = np.pad(t, ((0, tile - t.shape[0]), (0, tile - t.shape[1])))
            yield np.ascontiguousarray(t)


def write_rgb_tiff(path: str | os.PathLike, image: np.ndarray, mpp: tuple[float, float] | None, tile: int = 256,
                   levels: int = 4, compression: str | None = "zlib") -> None:
    """A small RGB tiled pyramidal TIFF (whole array in memory): for tests, benchmarks and conversions."""
    import tifffile

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tw:
        arr = image
        for k in range(levels):
            kw = {}
            if mpp is not None:
                kw = dict(resolution=(1e4 / (mpp[0] * 2**k), 1e4 / (mpp[1] * 2**k)), resolutionunit="CENTIMETER")
            tw.write(arr, tile=(tile, tile), photometric="rgb", compression=compression,
                     subfiletype=1 if k else 0, metadata=None, **kw)
            if min(arr.shape[:2]) < 2 * tile:
                break
            arr = np.asarray(Image.fromarray(arr).reduce(2))
