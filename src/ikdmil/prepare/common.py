"""What the patch preparers (Camelyon16, DigestPath) share: a resumable output folder and the summary.

Resumable output: work is done in units (one slide or one image). Every file is written atomically,
and when a unit is complete its records go to ``OUT/.ikdmil-prepare/done/UNIT.json``; a run started
again with the same options skips the finished units and redoes only the unfinished one. The options
are kept in ``OUT/.ikdmil-prepare/settings.json``: running into the same folder with other options
is refused (the outputs would mix). The manifest and the summary are written last, atomically.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ikdmil.data.manifest import MANIFEST_NAME, SPLITS, Sample, write_manifest
from ikdmil.data.scale import spread_starts
from ikdmil.errors import IkdmilError
from ikdmil.io import atomic_path, write_png, write_text

STATE_DIR = ".ikdmil-prepare"
HIST_BINS = 10


def natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def safe_name(name: str) -> str:
    """`name` with anything but letters, digits and ._- replaced: usable in a file name on any system."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


class ResumableOutput:
    def __init__(self, out: str | os.PathLike, preparer: str, settings: dict, sources: list[Path],
                 summary_name: str):
        self.out = Path(out).absolute()
        self.preparer = preparer
        self.summary_name = summary_name
        self.settings = json.loads(json.dumps(settings, default=str))
        out_r = self.out.resolve()
        if self.out.exists() and not self.out.is_dir():
            raise IkdmilError(f"{self.out}: exists and is a file; choose an output folder")
        for src in sources:
            src_r = Path(src).resolve()
            if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
                raise IkdmilError(f"{self.out}: overlaps the source folder {src}; choose an output folder outside it")
        self.state = self.out / STATE_DIR
        settings_file = self.state / "settings.json"
        if self.out.is_dir() and any(self.out.iterdir()):
            if not settings_file.is_file():
                raise IkdmilError(
                    f"{self.out}: folder is not empty and is not an unfinished or finished {preparer} preparation; "
                    "choose a new or empty output folder"
                )
            try:
                old = json.loads(settings_file.read_text())
            except (OSError, ValueError):
                old = {}
            if old.get("preparer") != preparer or old.get("settings") != self.settings:
                diff = _diff(old.get("settings") or {}, self.settings)
                raise IkdmilError(
                    f"{self.out}: was prepared by {old.get('preparer', 'something else')} with other options "
                    f"({diff}); use a new output folder, or the same options to resume"
                )
        (self.state / "done").mkdir(parents=True, exist_ok=True)
        write_text(settings_file, json.dumps({"preparer": preparer, "settings": self.settings}, indent=2) + "\n")

    def cache_path(self, kind: str, unit: str) -> Path:
        return self.state / kind / f"{safe_name(unit)}.json"

    def load(self, kind: str, unit: str):
        path = self.cache_path(kind, unit)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def save(self, kind: str, unit: str, data) -> None:
        write_text(self.cache_path(kind, unit), json.dumps(data) + "\n")

    def done(self, unit: str) -> list[dict] | None:
        data = self.load("done", unit)
        if data is None:
            return None
        if not all((self.out / r["image"]).is_file() and (not r["mask"] or (self.out / r["mask"]).is_file())
                   for r in data):
            return None  # files removed since: redo the unit
        return data

    def mark_done(self, unit: str, records: list[dict]) -> None:
        self.save("done", unit, records)

    def finish(self, records: list[dict], summary: dict) -> Path:
        order = {s: i for i, s in enumerate(SPLITS)}
        records = sorted(records, key=lambda r: (order[r["split"]], -r["label"], natural_key(r["image"])))
        samples = [Sample(self.out / r["image"], int(r["label"]), self.out / r["mask"] if r["mask"] else None,
                          r["split"], r.get("mpp"))
                   for r in records]
        manifest = write_manifest(samples, self.out / MANIFEST_NAME)
        summary = {"preparer": self.preparer, "settings": self.settings, **summary,
                   "counts": counts(records), "tumour_fraction_histogram": histogram(records)}
        write_text(self.out / self.summary_name, json.dumps(summary, indent=2) + "\n")
        return manifest


def files_by_stem(folder: Path, suffixes) -> dict[str, Path]:
    """Files of `folder` (any depth, not hidden) with one of `suffixes`, by lower-case stem; a stem found
    twice is an error, since labels are matched to files by name."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in suffixes:
            continue
        key = p.stem.lower()
        if key in found:
            raise IkdmilError(f"{p}: {p.stem} exists twice ({found[key]} and {p}); keep one")
        found[key] = p
    return found


def crop_positions(length: int, crop: int) -> list[int]:
    """Crop origins covering [0, length): evenly spread, the last one flush with the end."""
    return spread_starts(length, crop, crop)


def split_by_class(items: list[tuple[str, bool]], val: float, test: float, seed: int) -> dict[str, str]:
    """name -> split for (name, has_tumour) items: `val` / `test` of each class, drawn by `seed`; a class
    of three or more gets at least one of each asked-for split."""
    rng = random.Random(seed)
    out = {}
    for cls in (True, False):
        names = sorted((n for n, t in items if t == cls), key=natural_key)
        order = names[:]
        rng.shuffle(order)
        n_test = int(round(test * len(order)))
        n_val = int(round(val * len(order)))
        if len(order) >= 3:
            n_test = max(n_test, 1) if test > 0 else 0
            n_val = max(n_val, 1) if val > 0 else 0
        for i, n in enumerate(order):
            out[n] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(parts[:4]) or "unknown"


def counts(records: list[dict]) -> dict:
    out = {}
    for split in SPLITS:
        pos = sum(1 for r in records if r["split"] == split and r["label"] == 1)
        neg = sum(1 for r in records if r["split"] == split and r["label"] == 0)
        out[split] = {"pos": pos, "neg": neg, "total": pos + neg}
    return out


def histogram(records: list[dict], bins: int = HIST_BINS) -> dict:
    """Per split: how many positives have a tumour fraction in (0,0.1], (0.1,0.2], ..., (0.9,1]."""
    edges = [round(i / bins, 3) for i in range(bins + 1)]
    out = {"bins": [f"{edges[i]:.1f}-{edges[i + 1]:.1f}" for i in range(bins)]}
    for split in SPLITS:
        h = [0] * bins
        for r in records:
            if r["split"] == split and r["label"] == 1:
                f = float(r.get("tumour_fraction", 0.0))
                h[min(bins - 1, max(0, int(f * bins - 1e-9)))] += 1
        out[split] = h
    return out


def format_counts(records: list[dict]) -> str:
    c = counts(records)
    return ", ".join(f"{s} {c[s]['pos']} pos / {c[s]['neg']} neg" for s in SPLITS)


def save_patch_image(path: Path, rgb: np.ndarray, fmt: str) -> None:
    """Write a prepared patch atomically as PNG (lossless) or JPEG (quality 95, much smaller)."""
    if fmt == "png":
        write_png(path, rgb)
        return
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="JPEG", quality=95)
