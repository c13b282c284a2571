"""Accuracy benchmark on the real GlaS data: prepare -> MIL teacher -> IKD distillation -> test scores.

Prints one JSON line: teacher and student F1 / IoU / HD / HD95 on the test split (testA + testB),
the schedule, wall time and device. Model selection uses the validation split only.

    python benchmarks/glas.py                      # reduced CPU setting (see REDUCED)
    python benchmarks/glas.py --paper              # paper setting: 256 px, 30 + 10 + 450 epochs
    python benchmarks/glas.py --glas ../shared/data/glas --out /tmp/glas-bench --teacher-epochs 20
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from ikdmil.config import RunConfig
from ikdmil.engine.pipeline import Pipeline
from ikdmil.prepare.glas import prepare_glas

REPO = Path(__file__).resolve().parents[1]
REDUCED = dict(input_size=128, teacher_epochs=10, fusion_epochs=3, distill_epochs=20, swap_every=5)
PAPER = dict(input_size=256, teacher_epochs=30, fusion_epochs=10, distill_epochs=450, swap_every=30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glas", default=str(REPO.parent / "shared" / "data" / "glas"), help="GlaS folder")
    p.add_argument("--out", default=None, help="work folder (default: a temporary folder, removed)")
    p.add_argument("--paper", action="store_true", help="the paper's schedule (needs a GPU)")
    for k, v in REDUCED.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-sigma", type=float, default=3.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    schedule = dict(PAPER if args.paper else REDUCED)
    for k in REDUCED:
        if getattr(args, k) is not None:
            schedule[k] = getattr(args, k)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ikdmil-glas-"))
    t0 = time.perf_counter()
    manifest = prepare_glas(args.glas, work / "data", progress=False)
    if (work / "run").exists():
        shutil.rmtree(work / "run")
    cfg = RunConfig(data=str(manifest), out=str(work / "run"), batch_size=args.batch_size, lr=args.lr,
                    eval_sigma=args.eval_sigma, device=args.device, seed=args.seed,
                    cache_dir=str(work / "cache"), **schedule)
    results = Pipeline(cfg, progress=args.progress).run()
    wall = time.perf_counter() - t0

    def scores(role):
        t = results["models"].get(role, {}).get("test", {})
        return {k: t.get(k) for k in ("f1", "iou", "hd", "hd95", "f1_pos", "f1_neg", "iou_pos", "iou_neg")}

    device = results["device"]
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name(0)})"
    line = {
        "benchmark": "glas",
        "setting": "paper" if args.paper else "reduced",
        **schedule,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "eval_sigma": args.eval_sigma,
        "teacher": scores("teacher"),
        "student": scores("student"),
        "val": {r: e["val_score"] for r, e in results["models"].items()},
        "selected": results.get("selected"),
        "swaps": results["swaps"],
        "wall_s": round(wall, 1),
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(line))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
