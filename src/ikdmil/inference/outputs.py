"""What `ikdmil predict` owns in its output folder, and how several runs share one.

Ownership (nothing of the user's is ever replaced or written into):

- Every folder predict writes holds a marker file, ``.ikdmil-predict`` (JSON: ``kind``, ``files``,
  ikdmil version). Slide folders ``OUT/NAME/`` have kind ``"slide"`` and list their files; the
  patch-image folders ``OUT/masks/`` and ``OUT/overlays/`` have kinds ``"masks"`` and ``"overlays"``.
- A slide folder is replaced (a re-run with other settings, or ``--overwrite``) only when it holds a
  slide marker and nothing but the files that marker lists. Anything else there (no marker, a marker
  of another kind, a file the user added, a symbolic link, a file in place of the folder) is refused
  with one line naming the folder and the fix; that slide fails (exit 1) and the others go on.
- Patch masks and overlays are added to ``masks/`` and ``overlays/`` only when the folder is absent,
  empty or marked with its own kind; otherwise every patch image of the run fails with one line.

Index files (POSIX: every read-modify-write of them, and every folder replacement, happens under an
exclusive ``fcntl.flock`` on ``OUT/.ikdmil-predict.lock``, held for milliseconds, never while a model
runs; where ``fcntl`` does not exist (Windows) there is no lock and concurrent runs into one OUT are
not supported):

- ``predict_summary.json``: **merged**. ``slides`` has one entry per marked slide folder in OUT
  (rebuilt from the folders on disk and their ``summary.json``; ``status`` and ``config`` are those
  of the latest run that touched the slide, ``"done"`` for folders no index mentioned, e.g. after a
  kill; under torchrun also the ``rank`` that touched it) with its sanity ``warnings``; ``failures``
  keeps the latest failed attempt per input until a later run succeeds on that input; ``patches``
  counts the entries of ``patches.json``.
- ``report.html``: **rebuilt** from ``predict_summary.json`` and the slide folders after every run
  (`ikdmil.inference.report`).
- ``patches.json``: **merged**. One entry per patch image name (the NAME of ``masks/NAME.png``); a
  later run's entry replaces an earlier one of the same name; entries whose mask is gone are
  dropped. Every entry records the ``threshold`` and the ``config`` file of the run that made it.
- ``predict_config.yaml``: **one file per set of settings, never rewritten with other ones**. A run
  whose model (by its SHA-256) and output-defining settings (all but device, workers, batch size, AMP, overwrite)
  equal those of an existing ``predict_config*.yaml`` adds its inputs to that file; any other run
  writes the next free name, ``predict_config-2.yaml``, ``-3``, ... Each file stays a valid
  ``--config`` for reproducing its outputs, and the index entries name the file that made them.

Temporary files of killed runs (``.NAME.tmp-HOST-PID-*``) are removed at the start of the next
predict into the same OUT (`ikdmil.io.remove_stale_temps`; only those of dead processes of this host).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ikdmil import __version__
from ikdmil.errors import IkdmilError
from ikdmil.io import write_text

try:  # POSIX; see the module docstring for other systems
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

MARKER = ".ikdmil-predict"
LOCK_NAME = ".ikdmil-predict.lock"
CONFIG_NAME = "predict_config.yaml"
SUMMARY_INDEX = "predict_summary.json"
PATCH_INDEX = "patches.json"
PATCH_FOLDERS = ("masks", "overlays")
#: settings that do not change what is written (left out when deciding whether two runs share a config file)
RUNTIME_SETTINGS = ("device", "workers", "batch_size", "overwrite", "amp", "backend")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of the output folder `out` (see the module docstring)."""
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ------------------------------------------------------------------------------------------ ownership


def write_marker(folder: Path, kind: str, files: list[str] | None = None) -> None:
    info = {"written_by": "ikdmil predict", "ikdmil_version": __version__, "kind": kind}
    if files is not None:
        info["files"] = list(files)
    write_text(folder / MARKER, json.dumps(info, indent=2) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The marker of `folder` (a real folder, not a link), or None when it has none (or a damaged one)."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return None
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("kind"), str) else None


_KIND_WORDS = {"slide": "a slide's outputs", "masks": "patch masks", "overlays": "patch overlays"}


def check_owned(folder: Path, kind: str, exact: bool = False, subject: Path | None = None) -> bool:
    """Raise a one-line IkdmilError unless `folder` may be written as `kind`; True when it exists.

    Absent or empty folders may always be taken. `exact`: the folder is to be replaced as a whole, so
    it must hold nothing but its marker and the files the marker lists. `subject`: the input whose
    output `folder` is (the message then starts with it).
    """
    lead = f"{subject}: its output folder {folder}" if subject is not None else f"{folder}:"
    fix = "move or rename it, or choose another --out"
    if folder.is_symlink():
        raise IkdmilError(f"{lead} is a symbolic link, which ikdmil predict does not replace or write into; {fix}")
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise IkdmilError(f"{lead} is a file where ikdmil predict would write {_KIND_WORDS[kind]}; {fix}")
    try:
        entries = sorted(os.listdir(folder))
    except OSError as exc:
        raise IkdmilError(f"{lead} cannot be read ({exc.strerror}); {fix}") from None
    if not entries:
        return True
    info = read_marker(folder)
    if info is None:
        raise IkdmilError(f"{lead} exists and was not written by ikdmil predict (no {MARKER} marker), so it is "
                          f"left alone; {fix}")
    if info["kind"] != kind:
        fix = ("rename the slide file (its outputs go to OUT/NAME) or choose another --out" if kind == "slide" else
               "predict the patch images into another --out, or move that folder")
        raise IkdmilError(f"{lead} holds {_KIND_WORDS.get(info['kind'], info['kind'])} written by ikdmil "
                          f"predict, not {_KIND_WORDS[kind]}; {fix}")
    if exact:
        listed = set(info.get("files") or []) | {MARKER}
        foreign = [e for e in entries if e not in listed]
        if foreign:
            raise IkdmilError(f"{lead} holds {foreign[0]!r}, which ikdmil predict did not write, so the folder is "
                              f"not replaced; move that file out of it, or choose another --out")
    return True


def take_patch_folders(out: Path) -> None:
    """Check and mark OUT/masks and OUT/overlays for patch outputs (under the lock of `out`)."""
    with locked(out):
        for name in PATCH_FOLDERS:  # both checked before either is made
            check_owned(out / name, name)
        for name in PATCH_FOLDERS:
            folder = out / name
            folder.mkdir(exist_ok=True)
            if read_marker(folder) is None:
                write_marker(folder, name)


# ------------------------------------------------------------------------------------------ config files


def _comparable(cfg: dict) -> dict:
    settings = {k: v for k, v in (cfg.get("settings") or {}).items() if k not in RUNTIME_SETTINGS}
    return {"model": cfg.get("model_sha256") or cfg.get("model"), "settings": settings}


def config_files(out: Path) -> list[Path]:
    """predict_config.yaml, predict_config-2.yaml, ... in `out`, in order."""
    found = []
    for p in out.glob("predict_config*.yaml"):
        stem = p.name[len("predict_config"):-len(".yaml")]
        if stem == "":
            found.append((1, p))
        elif stem.startswith("-") and stem[1:].isdigit():
            found.append((int(stem[1:]), p))
    return [p for _, p in sorted(found)]


def record_config(out: Path, cfg: dict) -> Path:
    """Write the run's config (see the module docstring); returns the file that records this run."""
    import yaml

    with locked(out):
        files = config_files(out)
        for path in files:
            try:
                old = yaml.safe_load(path.read_text())
            except (OSError, ValueError, yaml.YAMLError):
                continue  # damaged or not ours: never rewritten, never matched
            if isinstance(old, dict) and _comparable(old) == _comparable(cfg):
                inputs = list(old.get("inputs") or [])
                new = [i for i in cfg["inputs"] if i not in inputs]
                if new:
                    old["inputs"] = inputs + new
                    write_text(path, yaml.safe_dump(old, sort_keys=False, allow_unicode=True))
                return path
        n = 1
        while True:
            path = out / (CONFIG_NAME if n == 1 else f"predict_config-{n}.yaml")
            if not path.exists():
                break
            n += 1
        write_text(path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
        return path


# ------------------------------------------------------------------------------------------ index files


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


SLIDE_KEYS = ("slide", "status", "tiles", "tumour_area_mm2", "tumour_fraction_of_tissue", "polygons", "seconds",
              "warnings")


def merge_indexes(out: Path, slides: list[dict], patches: list[dict], failures: list[tuple[str, str]],
                  succeeded: list[Path], config: str) -> None:
    """Merge this run's results into OUT/patches.json and OUT/predict_summary.json (under the lock).

    `slides`: this run's slide summaries (with "status"); `patches`: its patch entries; `failures`:
    (input, message); `succeeded`: inputs this run finished (their earlier failures are dropped);
    inputs are matched by their absolute path.
    """
    with locked(out):
        pindex = out / PATCH_INDEX
        entries: dict[str, dict] = {}
        for e in _read_json(pindex).get("images") or []:
            if isinstance(e, dict) and isinstance(e.get("image"), str):
                entries[Path(e["image"]).stem] = e
        for e in patches:
            entries[Path(e["image"]).stem] = dict(e, config=config)
        kept = [e for name, e in sorted(entries.items()) if (out / "masks" / f"{name}.png").is_file()]
        if kept or pindex.exists():
            write_text(pindex, _dumps({"images": kept}))

        sindex = out / SUMMARY_INDEX
        old = _read_json(sindex)
        latest = {e.get("folder") or Path(str(e.get("slide"))).stem: e for e in old.get("slides") or []
                  if isinstance(e, dict)}
        for s in slides:
            folder = Path(s.get("path") or s["slide"]).stem
            rank = {"rank": s["rank"]} if "rank" in s else {}  # torchrun: the rank that did (or skipped) it
            latest[folder] = dict({k: s.get(k) for k in SLIDE_KEYS}, folder=folder, config=config, **rank)
        listed = []
        for folder in _slide_folders(out):
            entry = latest.get(folder.name)
            if entry is None:
                summary = _read_json(folder / "summary.json")
                entry = dict({k: summary.get(k) for k in SLIDE_KEYS}, folder=folder.name, status="done", config=None)
            listed.append(entry)
        fails = {str(f.get("path") or f["input"]): f for f in old.get("failures") or []
                 if isinstance(f, dict) and isinstance(f.get("input"), str)}
        for i in succeeded:
            fails.pop(str(Path(i).resolve()), None)
        for i, m in failures:
            path = str(Path(i).resolve())
            fails[path] = {"input": i, "error": m, "path": path, "config": config}
        write_text(sindex, _dumps({"slides": listed, "patches": len(kept), "failures": list(fails.values())}))


def _slide_folders(out: Path) -> list[Path]:
    found = []
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        info = read_marker(Path(entry.path))
        if info is not None and info["kind"] == "slide" and (Path(entry.path) / "summary.json").is_file():
            found.append(Path(entry.path))
    return found
