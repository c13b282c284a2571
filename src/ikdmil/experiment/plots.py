"""F1 against distillation epoch for each ablation, in the style of the paper's Figs. 5-8.

For each run the stage-2 validation points of metrics.csv are cut into bins of `bin_width` epochs
(default: the run's swap_every, 30 in the paper). A bin's validation point is the best validation F1
of the student inside it; its test point is the test F1 logged at that same epoch (`test_f1`,
written when the engine's `track_test` is on), so the test curve is chosen on validation, never on
test. Points are the mean over seeds with sample-std error bars; the dashed line is the stage-1
teacher's score (its best epoch on validation), mean over seeds. One PNG per backbone and group:
`plots/<backbone>-<group>.png`, written with matplotlib's Agg canvas (no pyplot, no global backend).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

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

    Reads `val_f1` / `test_f1` when the engine writes them, else the older `val_student` column."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        if row.get("phase") != "distill":
            continue
        val = _num(row.get("val_f1")) if "val_f1" in row else None
        if val is None:
            val = _num(row.get("val_student"))
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
    for b, variant, seed, job in plan.entries:
        if b != backbone or variant not in names or not VARIANTS[variant].student or not job.finished():
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
    student_names = [v for v in plan.variants if VARIANTS[v].student]
    for b in plan.backbones:
        selection = None
        for _, _, _, job in plan.entries:
            if job.backbone == b and job.finished():
                selection = json.loads((job.run_dir / MARKER).read_text())["results"].get("selection_metric")
                break
        ylabel = "F1" if selection in (None, "val F1") else f"validation score ({selection})"
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
    folder = plan.out / "plots"
    for group in [*GROUPS, "all"]:  # plots of an earlier call with other variants would mislead
        for stale in folder.glob(f"*-{group}.png"):
            if stale not in written:
                stale.unlink()
    return written
