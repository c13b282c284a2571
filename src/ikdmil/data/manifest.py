"""Sample records and the two ways to describe a dataset: a manifest CSV or a folder layout.

Manifest CSV (header required)::

    image,label,mask,split,mpp
    train/pos/a.png,1,train/masks/a.png,train,0.62
    train/neg/b.png,0,,train,0.62

Relative paths are relative to the manifest's folder. `label` is 1 (tumour present) or 0; `mask` is
optional (it is only used for evaluation, never for training); `split` is train, val or test; `mpp`
is optional: the image file's resolution in µm per pixel, which preparers record so that training
can store the model's resolution for `predict`.

Folder layout::

    ROOT/{train,val,test}/pos/*.png     images with tumour
    ROOT/{train,val,test}/neg/*.png     images without tumour
    ROOT/{train,val,test}/masks/NAME.png  optional mask for the image with stem NAME
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ikdmil.errors import IkdmilError
from ikdmil.io import one_line, write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MANIFEST_COLUMNS = ("image", "label", "mask", "split", "mpp")
MANIFEST_NAME = "manifest.csv"


@dataclass(frozen=True)
class Sample:
    """One image with its image-level label, optional evaluation mask, split and resolution."""

    image: Path
    label: int
    mask: Path | None
    split: str
    mpp: float | None = None  # µm per pixel of the image file, when the preparer knew it


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def write_manifest(samples: Iterable[Sample], path: str | os.PathLike) -> Path:
    """Write samples as a manifest CSV (atomically), paths relative to its folder when possible."""
    path = Path(path)
    root = path.parent
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for s in samples:
        writer.writerow([_rel(s.image, root), int(s.label), _rel(s.mask, root) if s.mask else "", s.split,
                         f"{s.mpp:g}" if s.mpp else ""])
    write_text(path, buf.getvalue())
    return path


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise IkdmilError(f"{path}: manifest not found; give a manifest CSV or a dataset folder")
    root = path.parent
    samples = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(fh)
            header = [c.strip().lower() for c in next(reader, [])]
            missing = [c for c in ("image", "label", "split") if c not in header]
            if missing:
                raise IkdmilError(
                    f"{path}: manifest lacks column(s) {', '.join(missing)}; its first line must be the header "
                    f"{','.join(MANIFEST_COLUMNS)}"
                )
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue  # blank line
                row = dict(zip(header, (c.strip() for c in cells)))
                image, label, split = row.get("image", ""), row.get("label", ""), row.get("split", "")
                if not image:
                    raise IkdmilError(f"{path}:{line}: empty image path; "
                                      "fix the row: put the image file in the image column")
                if label not in ("0", "1"):
                    raise IkdmilError(
                        f"{path}:{line}: label must be 0 (no tumour) or 1 (tumour), got {label!r}; fix the label column"
                    )
                if split not in SPLITS:
                    raise IkdmilError(
                        f"{path}:{line}: split must be one of {', '.join(SPLITS)}, got {split!r}; fix the split column"
                    )
                mask_s = row.get("mask", "")
                sample = Sample(root / image, int(label), root / mask_s if mask_s else None, split,
                                _read_mpp(path, line, row.get("mpp", "")))
                for file in (sample.image, sample.mask):
                    if file is not None:
                        check_file_name(file)
                samples.append(sample)
    except UnicodeDecodeError as exc:
        raise IkdmilError(
            f"{path}: not a text CSV file ({exc.reason} at byte {exc.start}); give a UTF-8 manifest CSV or a "
            "dataset folder"
        ) from None
    except csv.Error as exc:
        raise IkdmilError(f"{path}: malformed CSV ({' '.join(str(exc).split())}); fix the file") from None
    except OSError as exc:
        raise IkdmilError(f"{path}: cannot read manifest ({' '.join(str(exc).split())}); check the file") from None
    if not samples:
        raise IkdmilError(f"{path}: manifest has no rows; add one line per image")
    _note_paths_outside(samples, path)
    return samples


def _read_mpp(path: Path, line: int, text: str) -> float | None:
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = -1.0
    if not 0 < mpp < 1000:
        raise IkdmilError(f"{path}:{line}: mpp must be the image's resolution in µm per pixel (e.g. 0.5), got "
                          f"{text!r}; fix the mpp column or leave it empty")
    return mpp


def _outside(file: Path, root: Path) -> bool:
    try:
        file.resolve().relative_to(root.resolve())
        return False
    except ValueError:
        return True


def _note_paths_outside(samples: list[Sample], manifest: Path) -> None:
    """Absolute or ``../`` paths are allowed (a shared image store is common), but said once, because a
    dataset copied elsewhere would then silently read files that are not part of it."""
    root = manifest.parent
    files = [f for s in samples for f in (s.image, s.mask) if f is not None]
    outside = [f for f in files if _outside(f, root)]
    if outside:
        log.warning("%s: %d of %d file path(s) lie outside the manifest's folder (e.g. %s); they are read as given",
                    manifest, len(outside), len(files), outside[0])


def check_file_name(path: Path) -> None:
    """Refuse, with one line naming the file, what would break later in a traceback: a symbolic link
    that loops, and a name that is not valid UTF-8 (it cannot be written to manifests or JSON)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise IkdmilError(f"{shown}: file name is not valid UTF-8; "
                          "rename the file (e.g. convmv -f latin1 -t utf8)") from None
    try:
        path.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # RuntimeError: "Symlink loop" (Python < 3.13), OSError: ELOOP
        raise IkdmilError(f"{path}: symbolic link loops ({one_line(exc)}); remove it or point it at an image") from None


def scan_folder(root: str | os.PathLike) -> list[Sample]:
    """Read the {train,val,test}/{pos,neg,masks} folder layout."""
    root = Path(root)
    if not root.is_dir():
        raise IkdmilError(f"{root}: dataset folder not found; create it or pass a manifest CSV")
    samples = []
    for split in SPLITS:
        masks = root / split / "masks"
        for cls, label in (("pos", 1), ("neg", 0)):
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for img in sorted(folder.iterdir()):
                if img.suffix.lower() not in IMAGE_SUFFIXES or img.name.startswith("."):
                    continue
                check_file_name(img)
                mask = next((m for m in (masks / (img.stem + ext) for ext in IMAGE_SUFFIXES) if m.is_file()), None)
                samples.append(Sample(img, label, mask, split))
    if not samples:
        raise IkdmilError(
            f"{root}: no images found; expected {root}/train/pos/*.png, {root}/train/neg/*.png, ... "
            f"or a {MANIFEST_NAME}"
        )
    return samples


def load_samples(source: str | os.PathLike) -> list[Sample]:
    """A manifest CSV, a folder holding manifest.csv, or a folder in the pos/neg layout."""
    source = Path(source)
    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        return read_manifest(source / MANIFEST_NAME)
    if source.suffix.lower() == ".csv" or source.is_file():
        return read_manifest(source)
    return scan_folder(source)


def select_split(samples: list[Sample], split: str, source: str | os.PathLike, need_both: bool) -> list[Sample]:
    """Samples of one split; error when it is empty or (for training) lacks a class."""
    src = Path(source)
    layout = src.is_dir() and not (src / MANIFEST_NAME).is_file()  # folder layout, not a manifest
    chosen = [s for s in samples if s.split == split]
    if not chosen:
        fix = (f"add images to {src / split / 'pos'} and {src / split / 'neg'}" if layout
               else f"add rows with split {split} to the manifest")
        raise IkdmilError(f"{source}: the {split!r} split has no images; {fix}")
    if need_both:
        for label, cls, name in ((1, "pos", "positive"), (0, "neg", "negative")):
            if not any(s.label == label for s in chosen):
                fix = (f"add images to {src / split / cls}" if layout
                       else f"add {split} rows with label {label} to the manifest")
                raise IkdmilError(
                    f"{source}: the {split!r} split has no {name} ({cls}) images, and MIL training needs both "
                    f"classes; {fix}"
                )
    return chosen


def samples_digest(samples: Iterable[Sample]) -> str:
    """Content key of a sample list: paths, labels, masks, mpp, and each file's size and mtime."""
    h = hashlib.sha256()
    for s in samples:
        for p in (s.image, s.mask):
            if p is None:
                h.update(b"-")
                continue
            st = p.stat() if p.exists() else None
            h.update(f"{p.resolve()}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}".encode())
        h.update(f"|{s.label}|{s.split}|{s.mpp}\n".encode())
    return h.hexdigest()[:16]
