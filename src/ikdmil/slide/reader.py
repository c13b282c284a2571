"""Whole-slide images behind one small reader interface, resolution handling.

The pyramidal TIFF writer lives in `ikdmil.slide.tiff`.

Readers
- `OpenSlideSlide`: everything OpenSlide opens (SVS, NDPI, MRXS, SCN, Philips/Ventana/Hamamatsu
  formats, generic tiled TIFF with a consecutive-IFD pyramid), via ``openslide-python`` +
  ``openslide-bin`` (pip only, no system packages).
- `ImageSlide`: plain PNG / JPEG / BMP / TIFF images up to `ikdmil.io.max_image_pixels()` (89 Mpx
  unless ``IKDMIL_MAX_IMAGE_PIXELS`` says otherwise), decoded once into memory.
- `TiffStripSlide`: larger plain TIFFs (stripped, or tiled ones OpenSlide does not take), read strip
  by strip (or tile by tile) with tifffile, keeping a bounded cache of decoded strips; never decoded
  whole. A larger PNG / JPEG / BMP cannot be read piecewise and is refused with a message that names
  the limit: convert it to a tiled pyramidal TIFF first (e.g. ``vips tiffsave in.png out.tif --tile
  --pyramid --compression deflate``) or raise the limit.
- A header whose pixel data is missing (a few bytes claiming a huge image) is reported as truncated.

Both return uint8 RGB arrays; transparent pixels (outside the scanned area, beyond the image border)
are composited onto white, which is what glass looks like.

Resolution is always in µm per level-0 pixel (`mpp`). It comes from the slide's metadata
(``openslide.mpp-x/y``, TIFF resolution tags in cm or inch, PNG/JPEG dpi) or from an explicit
override; values coarser than `MAX_PLAUSIBLE_MPP` (screen dpi defaults such as 72 dpi = 353 µm/px)
are treated as missing. `read_scaled` reads any level-0 box at any output size from the nearest
*finer* pyramid level and downsamples it (area-aware), so patches come at the model's resolution
whatever the scanner's magnification.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from ikdmil.errors import IkdmilError
from ikdmil.io import MAX_PIXELS_ENV, composite_over_white, image_to_rgb, max_image_pixels, one_line

# Pillow's own decompression-bomb guard is switched off in ikdmil.io (the one place); plain images are
# checked against max_image_pixels() below before any pixel is decoded.

#: suffixes taken from folders given as inputs (OpenSlide formats + plain images; DICOM series and other
#: multi-file formats are given by their main file)
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
INPUT_SUFFIXES = tuple(dict.fromkeys(SLIDE_SUFFIXES + PLAIN_SUFFIXES))
#: resolutions coarser than this (µm/px) in metadata are screen-dpi defaults, not scans
MAX_PLAUSIBLE_MPP = 20.0
MPP_HINT = "pass --mpp (µm per level-0 pixel, e.g. 0.25 for a 40x scan, 0.5 for 20x)"


class Slide:
    """A read-only multi-resolution RGB image; coordinates are level-0 pixels (x right, y down)."""

    path: Path
    kind: str  # "openslide:<vendor>" or "image"
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None  # (x, y) µm per level-0 pixel, None when unknown
    mpp_source: str  # "metadata", "--mpp", or "missing"

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 (h, w, 3) RGB of `size` (w, h) level-`level` pixels whose top-left is `location` (level 0)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def require_mpp(self) -> tuple[float, float]:
        if self.mpp is None:
            raise IkdmilError(f"{self.path}: no resolution (µm/px) in the slide's metadata; {MPP_HINT}")
        return self.mpp

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as `downsample` (level 0 when none is)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-6) and ds >= self.level_downsamples[best]:
                best = i
        return best


class OpenSlideSlide(Slide):
    def __init__(self, path: Path, handle, mpp_override: float | None = None):
        self.path = path
        self._osr = handle
        vendor = handle.properties.get("openslide.vendor", "unknown")
        self.kind = f"openslide:{vendor}"
        self.level_dimensions = tuple(tuple(int(v) for v in d) for d in handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        self.properties = dict(handle.properties)
        self.mpp, self.mpp_source = _resolve_mpp(_openslide_mpp(self.properties), mpp_override)

    def read_region(self, location, level, size):
        import openslide

        try:
            region = self._osr.read_region((int(location[0]), int(location[1])), int(level),
                                           (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as exc:
            raise IkdmilError(
                f"{self.path}: cannot read the slide at level {level}, {location} ({one_line(exc)}); the file is "
                "corrupt or truncated: copy it again"
            ) from None
        return composite_over_white(region)

    def close(self) -> None:
        try:
            self._osr.close()
        except Exception:  # noqa: BLE001 - closing a handle in an error state must not mask the real error
            pass


class ImageSlide(Slide):
    """A plain image held in memory as one level (see the module docstring)."""

    def __init__(self, path: Path, mpp_override: float | None = None, array: np.ndarray | None = None,
                 mpp: tuple[float, float] | None = None):
        self.path = path
        self.kind = "image"
        if array is None:
            array = _decode_plain(path)
            mpp = image_mpp(path)
        self.array = array
        h, w = array.shape[:2]
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.mpp, self.mpp_source = _resolve_mpp(mpp, mpp_override)

    def read_region(self, location, level, size):
        if level != 0:
            raise ValueError("ImageSlide has one level")
        return _crop(self.array, location, size)


def _crop(array: np.ndarray, location, size) -> np.ndarray:
    """uint8 (h, w, 3) box of an (H, W, 3) array at `location` (x, y) of `size` (w, h); white beyond its border."""
    x, y = int(location[0]), int(location[1])
    w, h = int(size[0]), int(size[1])
    out = np.full((h, w, 3), 255, np.uint8)
    H, W = array.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 > x0 and y1 > y0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = array[y0:y1, x0:x1]
    return out


class TiffStripSlide(Slide):
    """A plain TIFF larger than `max_image_pixels()`, read segment by segment (see the module docstring).

    Supported: 8- or 16-bit grayscale, RGB or RGBA, pixel-interleaved, in any compression tifffile
    decodes without extra packages (none, deflate, LZW, PackBits, ...); 16-bit is scaled as
    round(v * 255 / 65535), RGBA is laid on white. Decoded segments are kept in an LRU cache of
    `CACHE_BYTES`, so tiles read in row order decode each strip about once.
    """

    CACHE_BYTES = 256 * 2**20

    def __init__(self, path: Path, mpp_override: float | None = None):
        import tifffile

        self.path = path
        self.kind = "image:tiff"
        try:
            self._tf = tifffile.TiffFile(str(path))
            page = self._tf.pages[0]
            shape, dtype = page.shape, page.dtype
        except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds on damaged files
            raise IkdmilError(f"{path}: cannot read the TIFF ({one_line(exc)}); the file is corrupt or truncated: "
                              "copy it again") from None
        self._page = page
        try:
            self._check_layout(page, shape, dtype)
            self.level_dimensions = ((int(page.imagewidth), int(page.imagelength)),)
            self.level_downsamples = (1.0,)
            self.mpp, self.mpp_source = _resolve_mpp(image_mpp(path), mpp_override)
            self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
            self._cached = 0
            self._segment(0)  # decodes one segment: an unsupported compression fails here, not mid-slide
        except BaseException:
            self.close()
            raise

    def _check_layout(self, page, shape, dtype) -> None:
        w, h = int(page.imagewidth), int(page.imagelength)
        spp = int(page.samplesperpixel)
        limit = max_image_pixels()
        convert = ("; convert it to a tiled pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid "
                   f"--compression deflate), or raise the limit with {MAX_PIXELS_ENV}=N to decode it whole")
        if page.is_tiled:
            self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self._seg_h, self._seg_w = max(1, min(int(page.rowsperstrip or h), h)), w
        if np.dtype(dtype) not in (np.uint8, np.uint16) or spp not in (1, 3, 4) or (
                spp > 1 and int(page.planarconfig) != 1) or int(page.photometric) not in (1, 2):
            raise IkdmilError(
                f"{self.path}: a {w} x {h} px TIFF ({_mpx(w * h)}, above the {_mpx(limit)} limit for "
                f"plain images decoded whole) whose layout ({dtype}, {spp} samples, photometric "
                f"{int(page.photometric)}) cannot be read strip by strip" + convert)
        if self._seg_h * self._seg_w > limit:
            raise IkdmilError(
                f"{self.path}: a {w} x {h} px TIFF stored in strips of {self._seg_h} rows "
                f"({_mpx(self._seg_h * self._seg_w)} each, above the {_mpx(limit)} limit), so it cannot be read "
                "piecewise" + convert)
        self._grid_w = -(-w // self._seg_w)
        n = self._grid_w * -(-h // self._seg_h)
        offsets, counts = page.dataoffsets, page.databytecounts
        size = self.path.stat().st_size
        if len(offsets) < n or any(c <= 0 or o + c > size for o, c in zip(offsets[:n], counts[:n])):
            raise IkdmilError(
                f"{self.path}: the TIFF header says {w} x {h} px but pixel data is missing (the file is truncated "
                f"at {size} bytes); copy it again")

    def _segment(self, index: int) -> np.ndarray:
        """Segment `index` as uint8 (seg_h, seg_w, 3) RGB (edge segments may be smaller)."""
        seg = self._cache.get(index)
        if seg is not None:
            self._cache.move_to_end(index)
            return seg
        page = self._page
        fh = self._tf.filehandle
        try:
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
            arr = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as exc:  # noqa: BLE001 - codec errors come in many kinds
            raise IkdmilError(f"{self.path}: cannot decode the TIFF at strip/tile {index} ({one_line(exc)}); the "
                              "file is corrupt, truncated or compressed in a way tifffile cannot decode here: "
                              "convert it to a tiled pyramidal TIFF") from None
        if arr is None:
            raise IkdmilError(f"{self.path}: pixel data of strip/tile {index} is missing (the file is truncated); "
                              "copy it again")
        arr = np.asarray(arr).reshape(arr.shape[-3:])  # (h, w, samples)
        if arr.dtype == np.uint16:
            arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        elif arr.shape[2] == 4:
            arr = composite_over_white(arr)
        seg = np.ascontiguousarray(arr)
        self._cache[index] = seg
        self._cached += seg.nbytes
        while self._cached > self.CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return seg

    def read_region(self, location, level, size):
        if level != 0:
            raise ValueError("TiffStripSlide has one level")
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        W, H = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        for r in range(y0 // self._seg_h, -(-y1 // self._seg_h) if y1 > y0 else 0):
            for c in range(x0 // self._seg_w, -(-x1 // self._seg_w) if x1 > x0 else 0):
                seg = self._segment(r * self._grid_w + c)
                sy, sx = r * self._seg_h, c * self._seg_w
                ay0, ay1 = max(y0, sy), min(y1, sy + seg.shape[0], H)
                ax0, ax1 = max(x0, sx), min(x1, sx + seg.shape[1], W)
                if ay1 > ay0 and ax1 > ax0:
                    out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = seg[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx]
        return out

    def close(self) -> None:
        self._cache = OrderedDict()
        tf = getattr(self, "_tf", None)
        if tf is not None:
            tf.close()


#: the most a deflate stream can shrink data (1032:1), with room to spare: a PNG smaller than
#: raw bytes / this cannot hold its pixels
_DEFLATE_MAX_RATIO = 2000


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} Mpx" if pixels >= 10_000_000 else f"{pixels / 1e6:.2g} Mpx"


def _truncated(path: Path, w: int, h: int, why: str) -> IkdmilError:
    return IkdmilError(f"{path}: the image header says {w} x {h} px but {why}: the file is truncated or damaged; "
                       "copy it again or re-export it")


def open_plain_image(path: Path, mpp: float | None = None) -> Slide:
    """A plain image as a slide: in memory up to `max_image_pixels()`, a large TIFF piecewise, else refused."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            fmt, has_data = img.format, bool(img.tile)
            bands = len(img.getbands())
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exc:
        raise IkdmilError(f"{path}: cannot read the image ({one_line(exc)}); the file is corrupt, truncated or not "
                          "an image: copy it again") from None
    if not has_data:
        raise _truncated(path, w, h, "its pixel data is missing")
    size = path.stat().st_size
    if fmt == "PNG" and size < h * (1 + w * bands) / _DEFLATE_MAX_RATIO:
        raise _truncated(path, w, h, f"the file holds only {size} bytes, too few for that many pixels")
    limit = max_image_pixels()
    if w * h > limit:
        if fmt == "TIFF":
            return TiffStripSlide(path, mpp)
        raise IkdmilError(
            f"{path}: a {w} x {h} px {fmt or 'image'} ({_mpx(w * h)}), above the {_mpx(limit)} limit for "
            f"plain images, which {fmt or 'this format'} files must be decoded whole to read; convert it to a tiled "
            "pyramidal TIFF (e.g. vips tiffsave IN OUT.tif --tile --pyramid --compression deflate), or raise the "
            f"limit with {MAX_PIXELS_ENV}=N (about 3 bytes of memory per pixel)")
    return ImageSlide(path, mpp)


def _decode_plain(path: Path) -> np.ndarray:
    """Decode a plain image whole (the size was checked by `open_plain_image`) as uint8 RGB."""
    w = h = 0
    try:
        img = Image.open(path)
        w, h = img.size
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as exc:
        text = one_line(exc)
        if "truncated" in text or "cannot load" in text or isinstance(exc, EOFError):
            raise _truncated(path, w, h, f"its pixel data ends early ({text})") from None
        raise IkdmilError(f"{path}: cannot read the image ({text}); the file is corrupt, truncated or not an image: "
                          "copy it again") from None
    return image_to_rgb(img, path)


# ------------------------------------------------------------------------------------------ resolution


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp) or mpp <= 0 or mpp > MAX_PLAUSIBLE_MPP:
        return None
    return float(mpp)


def _openslide_mpp(props: dict) -> tuple[float, float] | None:
    def num(key):
        try:
            return float(props[key])
        except (KeyError, ValueError):
            return None

    mx, my = _plausible(num("openslide.mpp-x")), _plausible(num("openslide.mpp-y"))
    if mx is None or my is None:  # older OpenSlide: derive from the TIFF resolution tags ourselves
        unit = props.get("tiff.ResolutionUnit", "").lower()
        per = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
        xr, yr = num("tiff.XResolution"), num("tiff.YResolution")
        if per and xr and yr:
            mx, my = _plausible(per / xr), _plausible(per / yr)
    if mx is None or my is None:
        return None
    return mx, my


def image_mpp(path: Path) -> tuple[float, float] | None:
    """µm/px of a plain image from its TIFF resolution tags or PNG/JPEG dpi (None when absent/implausible)."""
    try:
        with Image.open(path) as img:
            info = dict(img.info)
            tags = getattr(img, "tag_v2", None)
            if tags is not None and 282 in tags and 283 in tags:
                unit = int(tags.get(296, 2))
                per = {2: 25400.0, 3: 1e4}.get(unit)
                if per:
                    mx, my = _plausible(per / float(tags[282])), _plausible(per / float(tags[283]))
                    return (mx, my) if mx and my else None
            dpi = info.get("dpi")
            if dpi and len(dpi) == 2 and dpi[0] and dpi[1]:
                mx, my = _plausible(25400.0 / float(dpi[0])), _plausible(25400.0 / float(dpi[1]))
                return (mx, my) if mx and my else None
    except (OSError, ValueError, ZeroDivisionError, TypeError):
        return None
    return None


def _resolve_mpp(found: tuple[float, float] | None, override: float | None):
    if override is not None:
        return (float(override), float(override)), "--mpp"
    if found is not None:
        return found, "metadata"
    return None, "missing"


# ----------------------------------------------------------------------------------------------- opening


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a slide or a plain image; a one-line IkdmilError when it is missing, corrupt or unsupported.

    OpenSlide is tried first (every format it knows, see the module docstring); a file it does not
    recognise but whose suffix is a plain image (`PLAIN_SUFFIXES`) is decoded into an `ImageSlide`,
    or read piecewise as a `TiffStripSlide` when it is a TIFF above `ikdmil.io.max_image_pixels()`
    (a larger PNG / JPEG / BMP is refused).

    Args:
        path: the slide file (for multi-file formats such as MRXS, the main file).
        mpp: µm per level-0 pixel, overriding the slide's metadata (e.g. 0.25 for a 40x scan); None:
            from the metadata, and `Slide.mpp` stays None when the metadata has none (or an
            implausible value: see `MAX_PLAUSIBLE_MPP`).

    Returns:
        A `Slide` (`OpenSlideSlide`, `ImageSlide` or `TiffStripSlide`), usable as a context manager that closes it.

    Raises:
        IkdmilError: the file is missing, a folder, corrupt, truncated or in an unsupported format,
            or `mpp` is not a plausible resolution; the message names the file and the fix.

    Example:
        >>> with open_slide("case1.svs") as slide:
        ...     slide.dimensions, slide.mpp, slide.level_downsamples
        ((98304, 71680), (0.2527, 0.2527), (1.0, 4.0, 16.0, 32.0))
        >>> with open_slide("scan.png", mpp=0.5) as slide:
        ...     tile = read_scaled(slide, (0, 0, 512, 512), (256, 256))  # uint8 (256, 256, 3) at 1 µm/px
    """
    path = Path(path)
    if not path.exists():
        raise IkdmilError(f"{path}: file not found; check the path")
    if path.is_dir():
        raise IkdmilError(f"{path}: is a folder, not a slide; pass the slide file")
    if mpp is not None and not (0 < float(mpp) <= 1000):
        raise IkdmilError(f"--mpp {mpp}: must be a positive resolution in µm/px (e.g. 0.25 or 0.5)")
    try:
        import openslide
    except (ImportError, OSError) as exc:  # pragma: no cover - a dependency (the library ships in openslide-bin)
        raise IkdmilError(
            f"OpenSlide is not available ({one_line(exc)}); pip install openslide-python openslide-bin"
        ) from None
    suffix = path.suffix.lower()
    error = None
    try:
        handle = openslide.OpenSlide(str(path))
        return OpenSlideSlide(path, handle, mpp)
    except openslide.OpenSlideUnsupportedFormatError as exc:
        error = exc
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        raise IkdmilError(
            f"{path}: cannot open the slide ({one_line(exc)}); the file is corrupt or truncated: copy it again"
        ) from None
    if suffix in PLAIN_SUFFIXES:
        return open_plain_image(path, mpp)  # PNG / JPEG / stripped TIFF: one-line errors name the file
    raise IkdmilError(
        f"{path}: not a slide OpenSlide can read ({one_line(error)}); the file is corrupt, truncated or in an "
        "unsupported format: copy it again or convert it to a tiled pyramidal TIFF"
    )


def is_plain_image(path: Path) -> bool:
    """True when OpenSlide does not recognise the file (a PNG/JPEG/stripped TIFF)."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path)) is None
    except (openslide.OpenSlideError, OSError):
        return True


def level0_area(path: Path) -> int:
    """Width x height of the slide's level 0 from its header alone (no pixels decoded); 0 when unreadable.

    A measure of a slide's work for sharing slides between ranks; errors surface when it is opened.
    """
    import openslide
    import tifffile

    try:
        with openslide.OpenSlide(str(path)) as handle:
            w, h = handle.dimensions
        return int(w) * int(h)
    except (openslide.OpenSlideError, OSError, ValueError):
        pass
    try:
        if path.suffix.lower() in (".tif", ".tiff"):  # PIL refuses huge ones before reading the header
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                return int(page.imagewidth) * int(page.imagelength)
        with Image.open(path) as img:
            return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001 - unreadable: weight 0, the slide fails on its own later
        return 0


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files as given; folders replaced by their slide/image files (sorted, not recursive, no hidden files)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir()
                           if q.is_file() and not q.name.startswith(".") and q.suffix.lower() in INPUT_SUFFIXES)
            if not found:
                raise IkdmilError(
                    f"{p}: folder holds no slides or images ({', '.join(INPUT_SUFFIXES)}); pass slide files"
                )
            files.extend(found)
        else:
            files.append(p)  # missing files are reported per input, the batch goes on
    return files


# ------------------------------------------------------------------------------------------------ reading


def read_scaled(slide: Slide, box: tuple[float, float, float, float], out_size: tuple[int, int]) -> np.ndarray:
    """uint8 (out_h, out_w, 3): the level-0 box (x, y, w, h; floats allowed) resampled to `out_size` (w, h).

    Reads the nearest finer pyramid level for the needed downsample and resizes (Pillow's area-aware
    bilinear); when the box maps onto whole pixels of a level at scale 1 the pixels are copied exactly.
    """
    x, y, w, h = (float(v) for v in box)
    ow, oh = int(out_size[0]), int(out_size[1])
    ds = min(w / ow, h / oh)
    level = slide.best_level(ds)
    lds = slide.level_downsamples[level]
    # the box in level coordinates
    lx, ly, lw, lh = x / lds, y / lds, w / lds, h / lds
    ix, iy = math.floor(lx), math.floor(ly)
    iw = math.ceil(lx + lw) - ix
    ih = math.ceil(ly + lh) - iy
    exact = (abs(lx - ix) < 1e-6 and abs(ly - iy) < 1e-6 and abs(lw - ow) < 1e-6 and abs(lh - oh) < 1e-6)
    if exact:
        return slide.read_region((round(ix * lds), round(iy * lds)), level, (ow, oh))
    region = slide.read_region((round(ix * lds), round(iy * lds)), level, (iw, ih))
    img = Image.fromarray(region)
    fbox = (lx - ix, ly - iy, lx - ix + lw, ly - iy + lh)
    return np.array(img.resize((ow, oh), Image.Resampling.BILINEAR, box=fbox, reducing_gap=None))  # writable


#: the most pixels `read_overview` reads from a level at once (its chunks shrink when a level is much finer)
OVERVIEW_READ_PIXELS = 4096 * 4096


def read_overview(slide: Slide, downsample: float, chunk: int = 1024) -> np.ndarray:
    """The whole slide at `downsample` (level-0 px per output px), read chunk by chunk (bounded memory:
    a chunk reads at most about `OVERVIEW_READ_PIXELS` from the level it comes from)."""
    W, H = slide.dimensions
    ow, oh = max(1, math.ceil(W / downsample)), max(1, math.ceil(H / downsample))
    factor = downsample / slide.level_downsamples[slide.best_level(downsample)]  # level px per output px
    step_x, step_y = min(chunk, ow), min(chunk, oh)
    if step_x * step_y * factor * factor > OVERVIEW_READ_PIXELS:
        # a level much finer than the overview (a single-level image): full-width bands, so each row of
        # the level is read once (a strip-by-strip reader decodes every strip once)
        step_x = ow
        step_y = max(1, int(OVERVIEW_READ_PIXELS / (ow * factor * factor)))
    out = np.empty((oh, ow, 3), np.uint8)
    for y0 in range(0, oh, step_y):
        for x0 in range(0, ow, step_x):
            cw, ch = min(step_x, ow - x0), min(step_y, oh - y0)
            out[y0:y0 + ch, x0:x0 + cw] = read_scaled(
                slide, (x0 * downsample, y0 * downsample, cw * downsample, ch * downsample), (cw, ch))
    return out
