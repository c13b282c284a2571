"""Test scores of finished runs -> table.md / table.csv / table.json, mean ± std over seeds.

Rows are (backbone, variant, model): `mil` has its stage-1 teacher, every other IKD variant its
student and the teacher it distilled from, and a comparison row (oeem, oaa, pistoseg,
supervised-unet) its segmentation network (model `segnet`). Both models are the ones selected on the validation split
(teacher: best stage-1 epoch; student: best validation score over stage 2); the test split is only
scored. std is the sample standard deviation (n - 1; 0 for one seed). Student rows also give
ΔF1 / ΔIoU: student minus its own teacher, paired per seed, mean ± std. A metric a summary lacks
(e.g. `hd_paper` before the engine reports it) is "–" in table.md and empty in table.csv.
"""

from __future__ import annotations

import csv
import io
import json
import math

from ikdmil.io import write_text

METRICS = ("f1", "iou", "hd", "hd95", "hd_paper")
LABELS = {"f1": "F1", "iou": "IoU", "hd": "HD", "hd95": "HD95", "hd_paper": "HD (paper)"}
DIGITS = {"f1": 3, "iou": 3, "hd": 1, "hd95": 1, "hd_paper": 1}
DELTAS = ("f1", "iou")
DASH = "–"
MODELS = ("teacher", "student", "segnet")  # segnet: the network of a comparison row (ikdmil.methods)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (n - 1) of the values that are not None; (None, None) when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def _test(results: dict, role: str) -> dict | None:
    return results.get("models", {}).get(role, {}).get("test")


def collect(plan) -> list[dict]:
    """One record per finished (backbone, variant, seed): the run folder and its test summaries."""
    from ikdmil.experiment.runner import MARKER
    from ikdmil.experiment.variants import VARIANTS

    records = []
    for backbone, variant, seed, job in plan.entries:
        if not job.finished():
            continue
        results = json.loads((job.run_dir / MARKER).read_text())["results"]
        teacher_dir = job.run_dir if job.teacher is None else job.teacher.run_dir
        if job.kind == "method":
            models = {"segnet": _test(results, "segnet")}
        else:
            models = {"teacher": _test(results, "teacher")}
            if VARIANTS[variant].student:
                models["student"] = _test(results, "student")
        records.append({"backbone": backbone, "variant": variant, "seed": seed,
                        "run_dir": str(job.run_dir.relative_to(plan.out)),
                        "teacher_dir": str(teacher_dir.parent.relative_to(plan.out)),
                        "selected": results.get("selected"), "swaps": results.get("swaps"),
                        "models": models})
    return records


def aggregate(records: list[dict]) -> list[dict]:
    """Rows (backbone, variant, model) in the order first seen, with per-seed values and mean ± std."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for model in MODELS:
            if model in r["models"]:
                groups.setdefault((r["backbone"], r["variant"], model), []).append(r)
    rows = []
    for (backbone, variant, model), recs in groups.items():
        recs = sorted(recs, key=lambda r: r["seed"])
        row = {"backbone": backbone, "variant": variant, "model": model, "seeds": [r["seed"] for r in recs],
               "teacher_dir": recs[0]["teacher_dir"], "runs": [r["run_dir"] for r in recs], "metrics": {}}
        for m in METRICS:
            values = [(r["models"][model] or {}).get(m) for r in recs]
            mean, std = mean_std(values)
            row["metrics"][m] = {"mean": mean, "std": std, "values": values}
        if model == "student":
            row["delta"] = {}
            for m in DELTAS:
                diffs = []
                for r in recs:
                    s, t = (r["models"]["student"] or {}).get(m), (r["models"]["teacher"] or {}).get(m)
                    diffs.append(None if s is None or t is None else s - t)
                mean, std = mean_std(diffs)
                row["delta"][m] = {"mean": mean, "std": std, "values": diffs}
        rows.append(row)
    order = {m: i for i, m in enumerate(MODELS)}
    first = {}
    for i, row in enumerate(rows):
        first.setdefault((row["backbone"], row["variant"]), i)
    return sorted(rows, key=lambda r: (first[(r["backbone"], r["variant"])], order[r["model"]]))


def _pm(stat: dict, digits: int, sign: bool = False) -> str:
    if stat["mean"] is None:
        return DASH
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{fmt.format(stat['mean'])} ± {stat['std']:.{digits}f}"


def _v(value, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def format_markdown(rows: list[dict], plan) -> str:
    s = plan.settings
    lines = [f"# ikdmil experiment: {plan.base.data}",
             "",
             f"Profile `{plan.profile.name}`, seeds {', '.join(map(str, plan.seeds))}. Test split; every model "
             f"selected on the validation split only. Mean ± sample std over seeds; HD in pixels at the model "
             f"input size ({plan.base.input_size} px). ΔF1 / ΔIoU: student minus its own teacher, paired per seed. "
             f"A teacher shared by several variants is listed once (table.csv has every row).",
             "",
             f"Command: `ikdmil experiment {s.data} --out {s.out} --profile {s.profile} --variants "
             f"{','.join(plan.variants)} --seeds {s.seeds}"
             + (f" --seed-start {s.seed_start}" if s.seed_start else "")
             + (f" --backbones {','.join(plan.backbones)}" if s.backbones else "")
             + "".join(f" --set {item}" for item in s.set) + "`",
             "",
             "| backbone | variant | model | seeds | " + " | ".join(LABELS[m] for m in METRICS) + " | ΔF1 | ΔIoU |",
             "|---|---|---|---|" + "---|" * (len(METRICS) + 2)]
    shown = set()
    visible = []
    for row in rows:
        if row["model"] == "teacher":
            group = (row["backbone"], row["teacher_dir"], tuple(row["seeds"]))
            if group in shown and row["variant"] != "mil":
                continue
            shown.add(group)
        visible.append(row)
        cells = [row["backbone"], row["variant"], row["model"], str(len(row["seeds"]))]
        cells += [_pm(row["metrics"][m], DIGITS[m]) for m in METRICS]
        cells += [_pm(row["delta"][m], DIGITS[m], sign=True) if "delta" in row else "" for m in DELTAS]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({sd for row in rows for sd in row["seeds"]})
    lines += ["", "Per seed (test F1 / IoU):", "",
              "| backbone | variant | model | " + " | ".join(f"seed {sd}" for sd in seeds) + " |",
              "|---|---|---|" + "---|" * len(seeds)]
    for row in visible:
        by_seed = dict(zip(row["seeds"], zip(row["metrics"]["f1"]["values"], row["metrics"]["iou"]["values"])))
        cells = [f"{_v(by_seed[sd][0], 3)} / {_v(by_seed[sd][1], 3)}" if sd in by_seed else DASH for sd in seeds]
        lines.append(f"| {row['backbone']} | {row['variant']} | {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict]) -> str:
    seeds = sorted({sd for row in rows for sd in row["seeds"]})
    head = ["backbone", "variant", "model", "n_seeds", "teacher_dir"]
    for m in METRICS:
        head += [f"{m}_mean", f"{m}_std"] + [f"{m}_seed{sd}" for sd in seeds]
    for m in DELTAS:
        head += [f"delta_{m}_mean", f"delta_{m}_std"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)

    def cell(v):
        return "" if v is None else repr(float(v))

    for row in rows:
        out = [row["backbone"], row["variant"], row["model"], len(row["seeds"]), row["teacher_dir"]]
        for m in METRICS:
            st = row["metrics"][m]
            by_seed = dict(zip(row["seeds"], st["values"]))
            out += [cell(st["mean"]), cell(st["std"])] + [cell(by_seed.get(sd)) for sd in seeds]
        for m in DELTAS:
            st = row.get("delta", {}).get(m, {"mean": None, "std": None})
            out += [cell(st["mean"]), cell(st["std"])]
        w.writerow(out)
    return buf.getvalue()


def write_tables(records: list[dict], plan) -> dict:
    rows = aggregate(records)
    table = {"data": plan.base.data, "profile": plan.profile.name, "seeds": plan.seeds, "backbones": plan.backbones,
             "variants": plan.variants, "split": "test", "selection": "validation split only",
             "std": "sample standard deviation (n - 1)", "rows": rows, "runs": records}
    write_text(plan.out / "table.json", json.dumps(table, indent=2))
    write_text(plan.out / "table.csv", format_csv(rows))
    write_text(plan.out / "table.md", format_markdown(rows, plan))
    return table
