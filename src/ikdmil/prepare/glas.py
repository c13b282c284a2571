"""Prepare the GlaS (Warwick-QU) gland-segmentation data set for weakly-supervised tumour segmentation.

Two source layouts are recognised automatically:

- the official challenge release: ``train_N.bmp`` / ``train_N_anno.bmp`` (instance labels, 0 is
  background), ``testA_N.bmp``, ``testB_N.bmp`` (with their ``_anno.bmp``) and ``Grade.csv``
  (``name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)``);
- the compact layout: ``images/NAME.jpg``, ``labels/NAME.png`` (0/255) and ``index.csv``
  (``name, split, grade_glas, grade_sirinukunwattana, patient_id, ...``).

Protocol: a malignant image is positive (label 1) and its gland mask (labels > 0) is the tumour mask; a
benign image is negative (label 0) with an all-zero mask. test = testA + testB. Validation images are
taken from ``train`` by patient (no patient in both train and val), deterministically from ``seed``;
the test split is never looked at when choosing them.

Output: ``out/{train,val,test}/{pos,neg}/NAME.ext``, ``out/{split}/masks/NAME.png`` (0/255),
``out/manifest.csv`` (with ``mpp`` = `GLAS_MPP`) and ``out/glas_summary.json``. The folder is built
as a sibling ``out.tmp-XXXX`` and renamed to ``out`` only when everything succeeded.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ikdmil.data.manifest import MANIFEST_NAME, Sample, write_manifest
from ikdmil.errors import IkdmilError
from ikdmil.io import make_temp_dir, read_rgb, remove_stale_temps, replace_folder, write_png, write_text
from ikdmil.prepare.common import natural_key

SUMMARY_NAME = "glas_summary.json"
PREPARER_ID = "ikdmil.prepare.glas"
#: µm/px of the GlaS images: the challenge scanned at 40x and released the images at 20x (0.62005 µm/px,
#: Sirinukunwattana et al. 2017); written to the manifest so that training knows the model's resolution
GLAS_MPP = 0.62
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_COPY_SUFFIXES = (".jpg", ".jpeg", ".png")  # stored byte for byte; anything else becomes PNG
_OFFICIAL_STEM = re.compile(r"^(train|testa|testb)_\d+$", re.IGNORECASE)
_OFFICIAL_EXPECTED = "Grade.csv with train_N.bmp, train_N_anno.bmp, testA_N.bmp, testB_N.bmp (official GlaS release)"
_SHARED_EXPECTED = "index.csv with images/NAME.jpg and labels/NAME.png"
_GRADES = {"benign": 0, "malignant": 1}


@dataclass(frozen=True)
class _Record:
    name: str
    source_split: str  # train, testA or testB
    label: int
    patient: str
    image: Path
    annotation: Path

    @property
    def split(self) -> str:
        return "train" if self.source_split == "train" else "test"


def _norm_header(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _canonical_source_split(value: str) -> str | None:
    return {"train": "train", "testa": "testA", "testb": "testB"}.get(value.strip().lower())


# ----------------------------------------------------------------------------------------- csv reading


def _read_table(path: Path, kind: str) -> list[tuple[int, dict[str, str]]]:
    """Rows of a GlaS csv as (line number, {role: value}); roles: name, patient, grade and (index.csv) split."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh, skipinitialspace=True))
    except (OSError, UnicodeDecodeError) as exc:
        raise IkdmilError(f"{path}: cannot read the csv ({exc}); re-export it as a UTF-8 text file") from None
    if not rows:
        raise IkdmilError(f"{path}: the file is empty; it needs a header and one row per image")
    header = [_norm_header(h) for h in rows[0]]

    def find(role: str, test) -> int:
        hits = [i for i, h in enumerate(header) if test(h)]
        if not hits:
            expected = (
                "name, patient ID, grade (GlaS), grade (Sirinukunwattana et al. 2015)"
                if kind == "official"
                else "name, split, grade_glas, grade_sirinukunwattana, patient_id"
            )
            raise IkdmilError(
                f"{path}: no {role} column in header {', '.join(rows[0])}; the header should be like: {expected}"
            )
        return hits[0]

    cols = {
        "name": find("name", lambda h: h in ("name", "image", "image name", "filename", "file name")),
        "patient": find("patient ID", lambda h: "patient" in h.split()),
    }
    grade_cols = [i for i, h in enumerate(header) if "grade" in h.split() and "glas" in h.split()]
    if not grade_cols:  # a lone "grade" column, as long as it is not the Sirinukunwattana one
        grade_cols = [i for i, h in enumerate(header) if "grade" in h.split() and "sirinukunwattana" not in h.split()]
    if not grade_cols:
        find("grade (GlaS)", lambda h: False)
    cols["grade"] = grade_cols[0]
    if kind == "shared":
        cols["split"] = find("split", lambda h: h == "split")

    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        values = {role: (row[i].strip() if i < len(row) else "") for role, i in cols.items()}
        out.append((line, values))
    if not out:
        raise IkdmilError(f"{path}: the csv has a header but no rows; add one row per image")
    return out


def _grade_to_label(value: str, path: Path, line: int, name: str) -> int:
    label = _GRADES.get(value.strip().lower())
    if label is None:
        raise IkdmilError(
            f"{path}:{line}: unknown grade {value!r} for {name}; the GlaS grade must be 'benign' or 'malignant'"
        )
    return label


def _patient(value: str, path: Path, line: int, name: str) -> str:
    value = value.strip()
    if re.fullmatch(r"\d+\.0+", value):  # "4.0" from a spreadsheet round trip is patient 4
        value = value.split(".")[0]
    if not value:
        raise IkdmilError(
            f"{path}:{line}: {name} has no patient ID; fill it in (validation is split by patient)"
        )
    return value


def _index_files(folder: Path, what: str) -> dict[str, Path]:
    """stem -> file for the image files in `folder`, refusing two files with the same stem."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise IkdmilError(
                f"{path}: {what} {path.stem!r} exists twice ({found[path.stem].name} and {path.name}); keep one"
            )
        found[path.stem] = path
    return found


# ------------------------------------------------------------------------------------ layout readers


def _find_grade_csv(src: Path) -> Path | None:
    return next((p for p in sorted(src.iterdir()) if p.is_file() and p.name.lower() == "grade.csv"), None)


def _has_official_images(src: Path) -> bool:
    return any(
        p.suffix.lower() == ".bmp" and _OFFICIAL_STEM.match(p.stem.removesuffix("_anno"))
        for p in src.iterdir()
    )


def _read_official(src: Path, grade_csv: Path) -> list[_Record]:
    images: dict[str, Path] = {}
    annos: dict[str, Path] = {}
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.suffix.lower() != ".bmp":
            continue
        stem = path.stem
        if stem.lower().endswith("_anno") and _OFFICIAL_STEM.match(stem[: -len("_anno")]):
            annos[stem[: -len("_anno")].lower()] = path
        elif _OFFICIAL_STEM.match(stem):
            images[stem.lower()] = path

    records = []
    seen: set[str] = set()
    for line, row in _read_table(grade_csv, "official"):
        name = row["name"]
        stem = name[:-4] if name.lower().endswith(".bmp") else name
        match = _OFFICIAL_STEM.match(stem)
        if not match:
            raise IkdmilError(
                f"{grade_csv}:{line}: name {name!r} does not look like train_N, testA_N or testB_N; "
                "fix the name column"
            )
        key = stem.lower()
        if key in seen:
            raise IkdmilError(f"{grade_csv}:{line}: {name} is listed twice; keep one row per image")
        seen.add(key)
        label = _grade_to_label(row["grade"], grade_csv, line, name)
        patient = _patient(row["patient"], grade_csv, line, name)
        if key not in images:
            raise IkdmilError(
                f"{src / (stem + '.bmp')}: image listed in {grade_csv.name} (line {line}) is missing; "
                "restore the file or delete its row"
            )
        if key not in annos:
            raise IkdmilError(
                f"{images[key]}: no annotation {stem}_anno.bmp next to it; restore the annotation or remove "
                f"the image and its row in {grade_csv.name}"
            )
        split = _canonical_source_split(match.group(1))
        records.append(_Record(images[key].stem, split, label, patient, images[key], annos[key]))

    for key, path in images.items():
        if key not in seen:
            raise IkdmilError(
                f"{path}: image has no row in {grade_csv}; add its patient ID and grade there, or remove the image"
            )
    return records


def _read_shared(src: Path, index_csv: Path) -> list[_Record]:
    images_dir, labels_dir = src / "images", src / "labels"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise IkdmilError(
                f"{folder}: folder not found next to {index_csv.name}; expected {_SHARED_EXPECTED}"
            )
    images = _index_files(images_dir, "image")
    labels = _index_files(labels_dir, "label")

    records = []
    seen: set[str] = set()
    for line, row in _read_table(index_csv, "shared"):
        name = row["name"]
        stem = Path(name).stem if Path(name).suffix.lower() in _IMAGE_SUFFIXES else name
        if stem in seen:
            raise IkdmilError(f"{index_csv}:{line}: {name} is listed twice; keep one row per image")
        seen.add(stem)
        split = _canonical_source_split(row["split"])
        if split is None:
            raise IkdmilError(
                f"{index_csv}:{line}: split {row['split']!r} for {name}; it must be train, testA or testB"
            )
        label = _grade_to_label(row["grade"], index_csv, line, name)
        patient = _patient(row["patient"], index_csv, line, name)
        if stem not in images:
            raise IkdmilError(
                f"{images_dir / (stem + '.jpg')}: image listed in {index_csv.name} (line {line}) is missing; "
                "restore the file or delete its row"
            )
        if stem not in labels:
            raise IkdmilError(
                f"{images[stem]}: no annotation {labels_dir / (stem + '.png')}; restore the label or remove "
                f"the image and its row in {index_csv.name}"
            )
        records.append(_Record(stem, split, label, patient, images[stem], labels[stem]))

    for stem, path in images.items():
        if stem not in seen:
            raise IkdmilError(
                f"{path}: image has no row in {index_csv}; add its split, grade and patient ID there, "
                "or remove the image"
            )
    return records


def _read_source(src: Path) -> tuple[str, list[_Record]]:
    if not src.exists():
        raise IkdmilError(
            f"{src}: GlaS folder not found; check the path (expected {_OFFICIAL_EXPECTED}, or {_SHARED_EXPECTED})"
        )
    if not src.is_dir():
        raise IkdmilError(f"{src}: is a file, not a folder; pass the folder that holds the GlaS files")
    grade_csv = _find_grade_csv(src)
    if grade_csv is not None:
        return "official", _read_official(src, grade_csv)
    if _has_official_images(src):
        raise IkdmilError(
            f"{src}: has train_N.bmp / testA_N.bmp files but no Grade.csv; put the release's Grade.csv next to them"
        )
    index_csv = src / "index.csv"
    if index_csv.is_file():
        return "shared", _read_shared(src, index_csv)
    if (src / "images").is_dir() or (src / "labels").is_dir():
        raise IkdmilError(f"{src}: has images/ or labels/ but no index.csv; expected {_SHARED_EXPECTED}")
    raise IkdmilError(
        f"{src}: not a GlaS folder; expected either {_OFFICIAL_EXPECTED}, or {_SHARED_EXPECTED}"
    )


# --------------------------------------------------------------------------------- validation split


def _choose_val_patients(records: list[_Record], val_fraction: float, seed: int, where: Path) -> set[str]:
    """Train patients to move to validation: about val_fraction of the train images, both classes.

    Candidates are the prefixes of seeded random orderings of the patients; the first one within 15 % of
    the target size and 0.1 of train's malignant fraction wins (so different seeds give different
    splits), otherwise the closest one. Train must keep both classes too. Only train records are passed.
    """
    if val_fraction <= 0:
        return set()
    counts: dict[str, list[int]] = {}
    for r in records:
        counts.setdefault(r.patient, [0, 0])[r.label] += 1
    patients = sorted(counts, key=natural_key)
    n_total = len(records)
    n_pos_total = sum(c[1] for c in counts.values())
    n_neg_total = n_total - n_pos_total
    pos_frac = n_pos_total / n_total
    target = val_fraction * n_total

    rng = random.Random(seed)
    best: tuple[float, frozenset[str]] | None = None
    for _ in range(2000):
        order = patients[:]
        rng.shuffle(order)
        chosen: list[str] = []
        neg = pos = 0
        for patient in order:
            chosen.append(patient)
            neg += counts[patient][0]
            pos += counts[patient][1]
            n = neg + pos
            if pos and neg and pos < n_pos_total and neg < n_neg_total:
                size_err = abs(n - target) / max(target, 1.0)
                class_err = abs(pos / n - pos_frac)
                if size_err <= 0.15 and class_err <= 0.1:
                    return set(chosen)
                score = size_err + class_err
                if best is None or score < best[0]:
                    best = (score, frozenset(chosen))
            if n >= target:
                break
    if best is None:
        raise IkdmilError(
            f"{where}: cannot take a validation split by patient that holds both benign and malignant images "
            f"and leaves both in train ({n_total} train images from {len(patients)} patients); "
            "use val_fraction=0 to skip validation"
        )
    return set(best[1])


# ------------------------------------------------------------------------------------------- writing


def _read_annotation(path: Path) -> np.ndarray:
    """Instance labels (or a 0/255 mask) as a bool gland mask: anything > 0 is gland."""
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise IkdmilError(
            f"{path}: cannot read the annotation ({exc}); the file is truncated or not an image — restore it"
        ) from None
    if arr.ndim == 3:
        return arr[..., :3].any(axis=-1)
    return arr > 0


def _is_previous_preparation(out: Path) -> bool:
    try:
        summary = json.loads((out / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("preparer") == PREPARER_ID


def _check_out(out: Path, src: Path) -> None:
    if out.exists() and not out.is_dir():
        raise IkdmilError(f"{out}: exists and is a file; choose another output folder")
    if out == src or out in src.parents:
        raise IkdmilError(f"{out}: the output folder holds the GlaS source {src}; choose an output folder outside it")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_preparation(out):
        raise IkdmilError(
            f"{out}: folder is not empty and is not a previous GlaS preparation; choose a new or empty output folder"
        )


def _write_sample(record: _Record, split: str, root: Path) -> Sample:
    cls = "pos" if record.label == 1 else "neg"
    suffix = record.image.suffix.lower()
    pixels = read_rgb(record.image)  # full decode: a truncated image fails here, not mid-training
    height, width = pixels.shape[:2]
    if suffix in _COPY_SUFFIXES:
        image_out = root / split / cls / record.image.name
        shutil.copyfile(record.image, image_out)
    else:
        image_out = root / split / cls / f"{record.image.stem}.png"
        write_png(image_out, pixels)
    glands = _read_annotation(record.annotation)
    if glands.shape != (height, width):
        raise IkdmilError(
            f"{record.annotation}: annotation is {glands.shape[1]}x{glands.shape[0]} px but its image "
            f"{record.image.name} is {width}x{height} px; pair each image with its own annotation"
        )
    mask = glands if record.label == 1 else np.zeros((height, width), dtype=bool)
    mask_out = root / split / "masks" / f"{record.image.stem}.png"
    write_png(mask_out, mask)
    return Sample(image_out, record.label, mask_out, split, GLAS_MPP)


def _summary(samples: list[Sample], patients: dict[str, set[str]], src_path: Path, layout: str,
             val_fraction: float, seed: int) -> dict:
    """glas_summary.json: counts per split and class, the patients of each split, the protocol."""
    counts = {
        split: {
            "pos": sum(1 for s in samples if s.split == split and s.label == 1),
            "neg": sum(1 for s in samples if s.split == split and s.label == 0),
        }
        for split in ("train", "val", "test")
    }
    for c in counts.values():
        c["total"] = c["pos"] + c["neg"]
    summary = {
        "preparer": PREPARER_ID,
        "source": str(src_path),
        "layout": layout,
        "val_fraction": val_fraction,
        "seed": seed,
        "counts": counts,
        "patients": {split: sorted(p, key=natural_key) for split, p in patients.items()},
        "n_patients": {split: len(p) for split, p in patients.items()},
        # GlaS's test set shares patients with its train set by design; this lists them openly.
        "test_patients_also_in_train_or_val": sorted(
            patients["test"] & (patients["train"] | patients["val"]), key=natural_key
        ),
        "protocol": "malignant -> pos with gland mask; benign -> neg with empty mask; "
        "test = testA + testB; val taken from train by patient",
    }
    return summary


def prepare_glas(
    src: str | os.PathLike,
    out: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Convert a GlaS folder into ikdmil's layout out/{train,val,test}/{pos,neg,masks} + out/manifest.csv;
    return the manifest path.

    Malignant images are positives with their gland mask as tumour mask, benign images negatives with an
    empty mask; test = testA + testB; validation is ~val_fraction of train, chosen by patient from `seed`.
    Everything is written into a sibling temporary folder first and renamed to `out` at the end, so an
    error leaves `out` untouched. A non-empty `out` is only replaced if it is a previous GlaS preparation.

    Args:
        src: the official release (``train_1.bmp`` + ``Grade.csv``) or ``images/ labels/ index.csv``.
        out: output folder.
        val_fraction: share of the train patients held out for validation (model selection).
        seed: which patients go to validation.
        progress: show a progress bar.

    Returns:
        The path of ``OUT/manifest.csv``.

    Example:
        >>> prepare_glas("../shared/data/glas", "data/glas")
    """
    src_path = Path(src).absolute()
    out_path = Path(out).absolute()
    if not 0.0 <= float(val_fraction) < 1.0:
        raise IkdmilError(f"val_fraction={val_fraction}: must be at least 0 and below 1 (e.g. 0.2)")

    layout, records = _read_source(src_path)
    _check_out(out_path.resolve(), src_path.resolve())
    records.sort(key=lambda r: (r.split, natural_key(r.name)))
    train = [r for r in records if r.split == "train"]
    if not train:
        raise IkdmilError(f"{src_path}: no train images; GlaS needs train_N images to train on")
    val_patients = _choose_val_patients(train, float(val_fraction), int(seed), src_path)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_path.parent)
    tmp = make_temp_dir(out_path, hidden=False)
    try:
        for split in ("train", "val", "test"):
            for sub in ("pos", "neg", "masks"):
                (tmp / split / sub).mkdir(parents=True)
        samples = []
        patients: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
        for record in tqdm(records, desc="GlaS", unit="img", disable=not progress):
            split = "val" if record.split == "train" and record.patient in val_patients else record.split
            samples.append(_write_sample(record, split, tmp))
            patients[split].add(record.patient)
        order = {"train": 0, "val": 1, "test": 2}
        samples.sort(key=lambda s: (order[s.split], natural_key(s.image.stem)))
        write_manifest(samples, tmp / MANIFEST_NAME)

        summary = _summary(samples, patients, src_path, layout, float(val_fraction), int(seed))
        write_text(tmp / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        _check_out(out_path.resolve(), src_path.resolve())  # the folder may have changed meanwhile
        replace_folder(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path / MANIFEST_NAME
