"""F1 against distillation epoch for each ablation, in the style of the paper's Figs. 5-8.

For each run the stage-2 validation points of metrics.csv are cut into bins of `bin_width` epochs
(default: the run's swap_every, 30 in the paper). A bin's validation point is the best validation F1
of the student inside it; its test point is the test F1 logged at that same epoch (`test_f1`,
written when the engine's `track_test` is on), so the test curve is chosen on validation, never on
test. Points are the mean over seeds with sample-std error bars; the dashed line is the stage-1
teacher's score (its best epoch on validation), mean over seeds. One PNG per backbone and group:
`plots/<backbone>-<group>.png`, written with matplotlib's Agg canvas (no pyplot, no global backend).

`plots/<backbone>-pseudo-masks.png` (the paper's Figs. 1 and 4): for a few validation images (positives
first), the image, its truth, each CAM row's pseudo-mask (oeem / oaa / pistoseg: their
`pseudo_masks_val.npy`), the MIL teacher's map and the IKD student's map, from the first seed for
which a CAM row and mil or ikd have finished. `pseudo_mask_figure` draws any such grid.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ikdmil.experiment.tables import mean_std
from ikdmil.io import atomic_path

GROUPS = {
    "kd-structure": ("KD structure (Figs. 5-6)", ["kd-output", "kd-block", "kd-fusion", "ikd"]),
    "swap": ("teacher/student swaps (Figs. 7-8)", ["ikd", "no-swap"]),
    "wce": ("wCE scale a (Tables 3-4)", ["no-wce", "wce-0", "wce-0.1", "wce-0.25", "ikd", "wce-0.5", "wce-1",
                                          "wce-5"]),
    "weight-decay": ("weight decay", ["ikd", "wd-authors"]),
}


def _num(text) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_validations(run_dir: Path) -> list[tuple[int, float, float | None]]:
    """(distill epoch, student validation score, test F1 or None) for every stage-2 validation point.

    The validation score is `val_score` (what the run's `--selection` compares: F1 or image AUC), else
    the older `val_f1` or `val_student` column."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        if row.get("phase") != "distill":
            continue
        val = next((v for v in map(_num, (row.get(k) for k in ("val_score", "val_f1", "val_student")))
                    if v is not None), None)
        epoch = _num(row.get("epoch"))
        if val is None or epoch is None:
            continue
        out.append((int(epoch), val, _num(row.get("test_f1"))))
    return out


def binned(points: list[tuple[int, float, float | None]], width: int) -> dict[int, tuple[float, float | None]]:
    """{bin end epoch: (best validation score in the bin, test F1 at that epoch)}; ties: the earliest."""
    best: dict[int, tuple[float, float | None]] = {}
    for epoch, val, test in points:
        end = math.ceil(epoch / width) * width
        if end not in best or val > best[end][0]:
            best[end] = (val, test)
    return best


def curve(run_dirs: list[Path], width: int) -> dict[str, list]:
    """Mean ± std over seeds per bin: {"x", "val", "val_std", "test", "test_std"} (test may hold None)."""
    per_seed = [binned(read_validations(d), width) for d in run_dirs]
    xs = sorted({x for b in per_seed for x in b})
    out = {"x": xs, "val": [], "val_std": [], "test": [], "test_std": []}
    for x in xs:
        m, s = mean_std([b[x][0] for b in per_seed if x in b])
        out["val"].append(m)
        out["val_std"].append(s)
        m, s = mean_std([b[x][1] for b in per_seed if x in b])
        out["test"].append(m)
        out["test_std"].append(s)
    return out


def _teacher_scores(jobs) -> tuple[float | None, float | None]:
    """Mean over seeds of the stage-1 teacher's validation score and test F1 (from the distill runs)."""
    from ikdmil.experiment.runner import MARKER

    vals, tests = [], []
    for job in jobs:
        entry = json.loads((job.run_dir / MARKER).read_text())["results"].get("models", {}).get("teacher", {})
        vals.append(entry.get("val_score"))
        tests.append((entry.get("test") or {}).get("f1"))
    return mean_std(vals)[0], mean_std(tests)[0]


def _curves(plan, backbone: str, names: list[str]) -> list[dict]:
    """Distinct distill runs of `names` (finished seeds only), in order; shared runs get one curve."""
    from ikdmil.experiment.variants import VARIANTS

    by_run: dict[str, dict] = {}
    for b, variant, _seed, job in plan.entries:
        if (b != backbone or variant not in names or not VARIANTS[variant].student or job.kind != "distill"
                or not job.finished()):
            continue
        canon = job.run_dir.parent.name
        c = by_run.setdefault(canon, {"names": [], "jobs": [], "teacher": str(job.teacher.run_dir.parent)})
        if variant not in c["names"]:
            c["names"].append(variant)
        if job not in c["jobs"]:
            c["jobs"].append(job)
    out = list(by_run.values())
    for c in out:
        c["names"].sort(key=names.index)
    return sorted(out, key=lambda c: names.index(c["names"][0]))


def plot_group(path: Path, title: str, curves: list[dict], width_setting: int, ylabel: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = []
    for c in curves:
        width = width_setting or c["jobs"][0].cfg.swap_every
        data.append((c, width, curve([j.run_dir for j in c["jobs"]], width), _teacher_scores(c["jobs"])))
    has_test = any(v is not None for _, _, cv, _ in data for v in cv["test"])
    panels = [("validation", "val")] + ([("test", "test")] if has_test else [])
    fig = Figure(figsize=(6.0 * len(panels), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    teachers = sorted({c["teacher"] for c in curves})
    colours = [f"C{i % 10}" for i in range(len(data))]
    for ax, (panel, key) in zip(axes, panels):
        drawn = set()
        for i, ((c, width, cv, (t_val, t_test)), colour) in enumerate(zip(data, colours)):
            seeds = len(c["jobs"])
            xs = [x + (i - (len(data) - 1) / 2) * width * 0.06 for x in cv["x"]]
            pts = [(x, m, s) for x, m, s in zip(xs, cv[key], cv[key + "_std"]) if m is not None]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-",
                            ms=4, lw=1.2, capsize=3, color=colour,
                            label=f"{' = '.join(c['names'])} (n={seeds})")
            t = t_val if key == "val" else t_test
            if t is not None and c["teacher"] not in drawn:
                drawn.add(c["teacher"])
                own = len(teachers) > 1
                ax.axhline(t, ls="--", lw=1.2, color=colour if own else "k",
                           label="MIL teacher" + (f" of {c['names'][0]}" if own else "") + " (best on val)")
        ax.set_title(f"{panel} split")
        widths = sorted({w for _, w, _, _ in data})
        ax.set_xlabel(f"distillation epoch (points: best of each {'/'.join(map(str, widths))} epochs on val)")
        ax.set_ylabel(ylabel if key == "val" else "F1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def write_plots(plan) -> list[Path]:
    from ikdmil.experiment.runner import MARKER
    from ikdmil.experiment.variants import VARIANTS

    written = []
    student_names = [v for v in plan.variants if VARIANTS[v].student
                     and any(v == name and j.kind == "distill" for _, name, _, j in plan.entries)]
    for b in plan.backbones:
        selections = {json.loads((job.run_dir / MARKER).read_text())["results"].get("selection_metric")
                      for _, _, _, job in plan.entries if job.backbone == b and job.finished()}
        other = sorted(str(s) for s in selections - {None, "val F1"})
        ylabel = "F1" if not other else f"validation score ({', '.join(sorted(selections - {None}))})"
        emitted = []
        groups = [(g, t, n) for g, (t, n) in GROUPS.items()] + [("all", "all variants", student_names)]
        for group, title, names in groups:
            curves = _curves(plan, b, names)
            runs = {c["teacher"] + "|" + ",".join(c["names"]) for c in curves}
            if group == "all":
                if not curves or any(runs == e for e in emitted):
                    continue
            elif len(curves) < 2:
                continue
            emitted.append(runs)
            path = plan.out / "plots" / f"{b}-{group}.png"
            plot_group(path, f"{b}: {title}", curves, plan.settings.bin_width, ylabel)
            written.append(path)
        figure = write_pseudo_mask_figure(plan, b)
        if figure is not None:
            written.append(figure)
    folder = plan.out / "plots"
    for group in [*GROUPS, "all", "pseudo-masks"]:  # plots of an earlier call with other variants would mislead
        for stale in folder.glob(f"*-{group}.png"):
            if stale not in written:
                stale.unlink()
    return written


# ------------------------------------------------------------------ the pseudo-masks figure (Figs. 1, 4)
CAM_ROWS = ("oeem", "oaa", "pistoseg")  # methods whose run folders hold pseudo_masks_val.npy


def pseudo_mask_figure(path: Path, images: np.ndarray, truths: np.ndarray, columns: list[tuple[str, np.ndarray]],
                       title: str = "") -> Path:
    """A grid: one row per image, columns image | truth | each named map (N,S,S) in [0,1] (masks or
    probabilities, shown in grey from 0 = black to 1 = white). PNG via matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heads = [("image", None), ("truth", np.asarray(truths, np.float32))] + [(n, np.asarray(m)) for n, m in columns]
    rows, cols = len(images), len(heads)
    fig = Figure(figsize=(1.9 * cols, 1.9 * rows + (0.4 if title else 0.1)), dpi=100)
    FigureCanvasAgg(fig)
    for r in range(rows):
        for c, (name, maps) in enumerate(heads):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            if maps is None:
                ax.imshow(np.asarray(images[r]))
            else:
                ax.imshow(np.asarray(maps[r], np.float32), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def _figure_runs(plan, backbone: str) -> tuple[int, dict] | None:
    """(seed, {column name: ("mask", npy path) | ("model", model path)}) of the first seed with a finished
    CAM row and a finished mil or ikd run, or None."""
    by_seed: dict[int, dict] = {}
    for b, variant, seed, job in plan.entries:
        if b != backbone or not job.finished():
            continue
        cols = by_seed.setdefault(seed, {})
        if job.kind == "method" and variant in CAM_ROWS and (job.run_dir / "pseudo_masks_val.npy").is_file():
            cols[f"{variant} pseudo-mask"] = ("mask", job.run_dir / "pseudo_masks_val.npy")
        elif job.kind == "teacher":
            cols["MIL teacher"] = ("model", job.run_dir / "teacher.safetensors")
        elif job.kind == "distill" and variant == "ikd":
            cols["MIL teacher"] = ("model", job.teacher.run_dir / "teacher.safetensors")
            cols["IKD student"] = ("model", job.run_dir / "student.safetensors")
    for seed in sorted(by_seed):
        cols = by_seed[seed]
        if any(k.endswith("pseudo-mask") for k in cols) and "MIL teacher" in cols:
            return seed, cols
    return None


def write_pseudo_mask_figure(plan, backbone: str, n: int = 4) -> Path | None:
    """`plots/<backbone>-pseudo-masks.png` for the first seed that has the runs (None when none has)."""
    from ikdmil.data.dataset import build_cache
    from ikdmil.data.manifest import load_samples, select_split
    from ikdmil.data.scale import scale_for_model
    from ikdmil.device import resolve_device
    from ikdmil.engine.evaluate import predict_fused
    from ikdmil.models.checkpoint import load_model

    found = _figure_runs(plan, backbone)
    if found is None:
        return None
    seed, cols = found
    cfg = plan.base
    samples = select_split(load_samples(cfg.data), "val", cfg.data, need_both=False)
    device = resolve_device(cfg.device)
    names = sorted(cols, key=lambda k: (not k.endswith("pseudo-mask"), k != "MIL teacher", k))
    models = {name: load_model(file, device) for name, (kind, file) in cols.items() if kind != "mask"}
    meta = next(iter(models.values()))[1] if models else {}  # every run of a seed shares the data's scale
    arrays = build_cache(samples, cfg.input_size, cfg.cache_dir or None, progress=False,
                         scale=scale_for_model(meta, samples, cfg.input_size))
    labels = np.asarray(arrays.labels)
    order = [i for i in np.argsort(-labels, kind="stable") if arrays.has_mask[i]][:n]
    if not order:
        return None
    columns = []
    for name in names:
        kind, file = cols[name]
        if kind == "mask":
            maps = np.load(file)
            if maps.shape[0] != len(labels):  # written for another validation split
                continue
            maps = maps[order].astype(np.float32)
        else:
            maps = predict_fused(models[name][0], arrays, device)[order]
        columns.append((name, maps))
    images = np.asarray(arrays.images[order])
    truths = np.asarray(arrays.masks[order], np.float32)
    return pseudo_mask_figure(plan.out / "plots" / f"{backbone}-pseudo-masks.png", images, truths, columns,
                              f"{backbone}, seed {seed}: validation images")
