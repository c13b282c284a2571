"""Reading images and masks with clear errors, and writing files atomically.

Conversions we do on purpose (documented in the README):
- grayscale images are replicated to three channels;
- RGBA / LA / palette-with-transparency images are composited over white (transparent = glass =
  background), so a fully transparent pixel becomes (255, 255, 255);
- 16-bit images are scaled to 8 bits over the full 16-bit range, round(v * 255 / 65535): 65535 -> 255,
  32896 -> 128, 0 -> 0 (the same for every image, never stretched per image; 16-bit RGB is reduced to
  its high byte by Pillow, which gives the same values for these examples);
- 32-bit integer images with values up to 65535 are treated as 16-bit, float images as 0..1 (or
  0..255 when a value exceeds 1); anything outside those ranges is rejected.
Masks must hold exactly two values, 0 and 255 or 0 and 1 (a single value is fine); anything else is
rejected, because guessing a threshold silently changes what the model is scored against.

Patches and masks larger than `max_image_pixels()` (Pillow's own default, 89 Mpx, unless the
environment variable ``IKDMIL_MAX_IMAGE_PIXELS`` says otherwise) are refused before any pixel is
decoded: a 109-byte file may claim 30000 x 30000 px, and a really large image is a slide, which
`ikdmil predict` reads tile by tile.

Every problem is an `IkdmilError` whose one-line message names the file and says what to do.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ikdmil.errors import IkdmilError

log = logging.getLogger(__name__)

MAX_PIXELS_ENV = "IKDMIL_MAX_IMAGE_PIXELS"
# Pillow's global guard is off (slides are legitimately huge and are read by the slide reader); patches
# and masks get our own limit in open_image, with a message that says what to do.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression-bomb warning limit (~9459 x 9459 px)


def max_image_pixels() -> int:
    """The largest patch or mask (in pixels) we decode whole; set by IKDMIL_MAX_IMAGE_PIXELS."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise IkdmilError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels, e.g. 200000000")
    return value


def chmod_default(path: str | os.PathLike, mode: int) -> None:
    """chmod to `mode` minus the process umask, i.e. what a plain open()/mkdir() would have given."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def owner_tag() -> str:
    """``HOST-PID``: put into every temporary name, so a later run can tell an abandoned one (its process
    is gone) from one that another live process is still writing."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def temp_prefix(target: str | os.PathLike, hidden: bool = True) -> str:
    """The name prefix of temporary files and folders written for `target` by this process."""
    return f"{'.' if hidden else ''}{Path(target).name}.tmp-{owner_tag()}-"


def make_temp_dir(target: str | os.PathLike, hidden: bool = True) -> Path:
    """A new temporary folder beside `target`, to be renamed onto it when complete."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(target, hidden), dir=target.parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files and folders in `folder` left by killed ikdmil processes of this host.

    Only names written by `atomic_path` / `make_temp_dir` whose process no longer runs are removed; a
    temporary of a live process (a concurrent run) or of another host (a shared disk) is left alone.
    Each command calls this on the folders it writes, so a kill never leaves full-size memory maps
    behind for good. Returns what was removed.
    """
    folder = Path(folder)
    host = owner_tag().rsplit("-", 1)[0]
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if ".tmp-" not in name:
            continue
        owner = name.split(".tmp-", 1)[1].split("-")
        if len(owner) < 3 or owner[0] != host or not owner[1].isdigit():
            continue
        if int(owner[1]) == os.getpid() or _pid_alive(int(owner[1])):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", folder, len(removed))
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    Readers never see a half-written file, and an interrupted run leaves no partial output (a kill
    leaves a temporary named by `temp_prefix`, which `remove_stale_temps` clears on the next run).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        chmod_default(tmp_path, 0o666)  # mkstemp makes 0600 files; give outputs the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_png(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 HxW or HxWx3 array (or a bool mask, stored as 0/255) as PNG, atomically."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (library messages sometimes span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def replace_folder(tmp: Path, out: Path, hidden: bool = False) -> None:
    """Rename the finished folder `tmp` to `out`; an existing `out` is moved aside first and deleted only
    after the rename succeeded (restored if it failed), so a crash never leaves neither."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{'.' if hidden else ''}{out.name}.old-", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def open_header(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header (nothing decoded), or a one-line error naming the file."""
    if not path.is_file():
        raise IkdmilError(f"{path}: image file not found; check the path in the manifest or folder")
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise IkdmilError(f"{path}: cannot read image ({one_line(exc)}); the file is not an image: re-export it or "
                          "remove it from the dataset") from None


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, or raise a one-line error naming the file."""
    if not path.exists():
        raise IkdmilError(f"{path}: file not found; check the path in the manifest or folder")
    if path.is_dir():
        raise IkdmilError(f"{path}: is a folder, not an image; check the path in the manifest or folder")
    limit = max_image_pixels()
    try:
        img = Image.open(path)  # reads the header only
        width, height = img.size
        if width * height > limit:
            img.close()
            raise IkdmilError(
                f"{path}: image header says {width} x {height} px ({width * height / 1e6:.0f} Mpx), above the "
                f"{limit / 1e6:.0f} Mpx limit for patches and masks; segment a large image as a slide with "
                f"ikdmil predict, or raise the limit with {MAX_PIXELS_ENV}=N"
            )
        img.load()  # forces a full decode, so truncated files fail here and not mid-epoch
    except PermissionError as exc:
        raise IkdmilError(f"{path}: cannot open ({one_line(exc)}); make the file readable") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, zlib.error) as exc:
        raise IkdmilError(
            f"{path}: cannot read image ({one_line(exc)}); the file is truncated or not an image: "
            "re-export it or remove it from the dataset"
        ) from None
    return img


def _to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Scale one image's pixels to uint8 with a fixed rule per pixel type (see the module docstring)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        lo = int(arr.min()) if arr.size else 0
        hi = int(arr.max()) if arr.size else 0
        if arr.dtype.itemsize == 1:  # int8
            return np.clip(arr, 0, 255).astype(np.uint8)
        if lo < 0 or hi > 65535:
            raise IkdmilError(
                f"{path}: {arr.dtype} pixel values {lo}..{hi} are outside 0..65535; save it as an 8-bit "
                "(or 16-bit) RGB PNG"
            )
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr).all()
        lo = float(arr.min()) if arr.size else 0.0
        hi = float(arr.max()) if arr.size else 0.0
        if not finite or lo < 0 or hi > 255:
            raise IkdmilError(
                f"{path}: floating-point pixel values {lo:g}..{hi:g} are not in 0..1 or 0..255; save it as "
                "an 8-bit RGB PNG"
            )
        scale = 1.0 if hi <= 1.0 else 255.0
        return np.clip(np.rint(arr.astype(np.float64) * 255.0 / scale), 0, 255).astype(np.uint8)
    raise IkdmilError(f"{path}: unsupported pixel type {arr.dtype}; save it as an 8-bit RGB PNG")


def composite_over_white(rgba: Image.Image) -> np.ndarray:
    """uint8 HxWx3 RGB of an RGBA image laid on white (transparent = glass = background).

    Shared by patch reading and slide reading (OpenSlide marks areas outside the scan as (0,0,0,0))."""
    arr = np.asarray(rgba)
    if arr.ndim == 3 and arr.shape[2] == 4:
        if (arr[..., 3] == 255).all():
            return np.ascontiguousarray(arr[..., :3])
        alpha = arr[..., 3:4].astype(np.uint16)
        out = (arr[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    return np.array(rgba.convert("RGB"))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read any common image as uint8 HxWx3 RGB (see the module docstring for conversions)."""
    path = Path(path)
    return image_to_rgb(open_image(path), path)


def image_to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """A decoded Pillow image as uint8 HxWx3 RGB, by the conversions of the module docstring (errors name `path`)."""
    try:
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
            arr = composite_over_white(img.convert("RGBA"))
        elif img.mode.startswith("I") or img.mode == "F":  # I, I;16, I;16B, I;16L, ..., F
            arr = _to_uint8(np.asarray(img), path)
        elif img.mode == "RGB":
            arr = np.asarray(img)
        else:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as exc:  # a mode Pillow cannot convert
        raise IkdmilError(
            f"{path}: cannot convert {img.mode} image to RGB ({one_line(exc)}); save it as an 8-bit RGB PNG"
        ) from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise IkdmilError(f"{path}: expected an RGB image, got array shape {arr.shape}; convert it to RGB")
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr, path)
    return np.ascontiguousarray(arr)


def read_mask(path: str | os.PathLike, expect_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask (0/255 or 0/1) as bool HxW; reject anything ambiguous.

    `expect_shape` (H, W) is the image's size: a mask of another size is an error, not a resize,
    because a mismatch usually means the wrong mask was paired with the image.
    """
    path = Path(path)
    img = open_image(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        if arr.shape[2] in (2, 4):  # LA / RGBA: ignore the alpha channel
            arr = arr[..., :-1]
        if not (arr == arr[..., :1]).all():
            raise IkdmilError(
                f"{path}: mask is a colour image; save it as a single-channel PNG with 0 = background "
                "and 255 (or 1) = tumour"
            )
        arr = arr[..., 0]
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if len(values) > 6 else "")
        raise IkdmilError(
            f"{path}: mask values are {{{shown}}}, expected only 0/255 or 0/1; binarise it "
            "(e.g. instance labels: mask = labels > 0) and save it as PNG"
        )
    if expect_shape is not None and tuple(arr.shape[:2]) != tuple(expect_shape):
        raise IkdmilError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} px but its image is "
            f"{expect_shape[1]}x{expect_shape[0]} px; pair each image with its own mask"
        )
    return arr > 0
