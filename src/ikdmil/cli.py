"""`ikdmil` command line: demo, synth, prepare, train, distill, run, evaluate, predict.

Every command has --help. Each command's options come from its settings dataclass (`RunConfig`,
`EvaluateSettings`, `DemoSettings`, `PredictSettings`, `TissueParams`; see `ikdmil.options`), so a
new field is a new option. User-fixable problems, bad options included, end with a one-line message
naming the file or option and the fix, and exit status 2; an interrupted training run is continued
with --resume. Library code logs to the `ikdmil` loggers; only `main` decides what reaches the
terminal (--quiet: warnings and errors only, no progress bars; -v: debug messages too).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ikdmil import __version__
from ikdmil.config import DEMO_RUN_DEFAULTS, DemoSettings, EvaluateSettings, RunConfig
from ikdmil.errors import IkdmilError
from ikdmil.options import (
    HelpFormatter,
    Parser,
    add_settings_options,
    add_verbosity_options,
    configure_logging,
    file_values,
    given_values,
    number,
    release_logging,
    settings_from_args,
)
from ikdmil.typed_settings import check_output_folder, coerce, settings_from_mapping

RESUME_HINT = "continue the run with the same command and --resume"
DEMO_SKIP = ("data", "out", "cache_dir")  # RunConfig fields the demo sets itself


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


# ------------------------------------------------------------------ commands
def cmd_synth(args) -> int:
    from ikdmil.prepare.synth import make_synthetic_dataset

    check_output_folder(args.out, "OUT")
    manifest = make_synthetic_dataset(args.out, n=args.n, seed=args.seed, size=args.size, progress=_progress(args))
    print(f"wrote {manifest}")
    return 0


def cmd_prepare(args) -> int:
    if args.dataset == "glas":
        from ikdmil.prepare.glas import prepare_glas

        if args.extra is not None:
            raise IkdmilError(f"prepare glas takes two folders, SRC OUT; got a third one ({args.extra})")
        check_output_folder(args.out, "OUT")
        manifest = prepare_glas(args.src, args.out, val_fraction=args.val_fraction, seed=args.seed,
                                progress=_progress(args))
    elif args.extra is None:
        what = {"camelyon16": "SLIDES_DIR ANNOTATIONS_DIR", "digestpath": "IMAGES_DIR MASKS_DIR",
                "regions": "SLIDES LABELS"}[args.dataset]
        raise IkdmilError(f"prepare {args.dataset}: give {what} OUT (three paths)")
    else:
        check_output_folder(args.extra, "OUT")
        prepare = {"camelyon16": _prepare_camelyon16, "digestpath": _prepare_digestpath,
                   "regions": _prepare_regions}[args.dataset]
        manifest = prepare(args)
    print(f"wrote {manifest}")
    return 0


def _tissue_params(args):
    from ikdmil.slide.tissue import TissueParams

    return settings_from_mapping(TissueParams, given_values(args, TissueParams, "tissue."), "command line")


def _prepare_camelyon16(args) -> Path:
    from ikdmil.prepare.camelyon16 import Camelyon16Options, prepare_camelyon16

    opts = Camelyon16Options(
        patch_size=args.patch_size or 1280, level=args.level, mpp=args.mpp,
        max_background=args.max_background if args.max_background is not None else 0.8,
        test_max_background=args.test_max_background, min_tumour_fraction=args.min_tumour_fraction,
        neg_ratio=args.neg_ratio, max_pos_per_slide=args.max_per_slide, val_fraction=args.val_fraction,
        seed=args.seed, image_format=args.image_format, exclude=tuple(args.exclude or ()),
        exclusion_groups=tuple(g.strip() for g in args.exclusion_groups.split(",") if g.strip()),
        reference=args.reference, tissue=_tissue_params(args))
    return prepare_camelyon16(args.src, args.out, args.extra, opts, progress=_progress(args))


def _prepare_digestpath(args) -> Path:
    from ikdmil.prepare.digestpath import DigestPathOptions, prepare_digestpath

    opts = DigestPathOptions(
        crop_size=args.patch_size or 1536,
        max_background=args.max_background if args.max_background is not None else 0.8,
        min_tumour_fraction=args.min_tumour_fraction, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, mpp=args.mpp or 0.5,
        image_format=args.image_format, tissue=_tissue_params(args))
    return prepare_digestpath(args.src, args.out, args.extra, opts, progress=_progress(args))


#: RegionsOptions fields that come from the options every slide preparer shares
REGIONS_SHARED = ("mpp", "patch_size", "max_background", "val_fraction", "test_fraction", "seed", "image_format",
                  "tissue")


def _prepare_regions(args) -> Path:
    from ikdmil.prepare.regions import RegionsOptions, prepare_regions

    shared = {name: getattr(args, name) for name in REGIONS_SHARED if name != "tissue"}
    opts = settings_from_args(RegionsOptions, args, dest_prefix="regions.", skip=REGIONS_SHARED,
                              tissue=_tissue_params(args), **shared)
    return prepare_regions(args.src, args.out, args.extra, opts, progress=_progress(args))


def cmd_predict(args) -> int:
    from ikdmil.inference import PredictSettings, predict

    base = file_values(PredictSettings, args.config, section="settings") if args.config else None
    settings = settings_from_args(PredictSettings, args, base).validate()  # everything checked before any work
    check_output_folder(args.out)
    report = predict(args.model, args.inputs, args.out, settings, progress=_progress(args))
    if report.rank != 0:  # torchrun: rank 0 reports every rank's results and decides the exit status
        return 0
    done = sum(1 for s in report.slides if s.get("status") == "done")
    skipped = sum(1 for s in report.slides if s.get("status") == "skipped")
    warned = sum(1 for s in report.slides if s.get("warnings"))
    print(f"{done} slides segmented, {skipped} already done, {len(report.patches)} patch images; "
          f"outputs and {report.config_path.name} in {args.out}; {warned} slides with warnings; overview: "
          f"{Path(args.out) / 'report.html'}")
    if report.failures:
        for _, message in report.failures:
            print("ikdmil: error: " + message, file=sys.stderr)
        print(f"ikdmil: {len(report.failures)} input(s) failed (listed above); the others were processed",
              file=sys.stderr)
        return 1
    return 0


def _run_config(args) -> RunConfig:
    """Defaults < --config, else the saved run config on --resume < options given < DATA and --out."""
    saved = Path(args.out) / "config.yaml"
    source = args.config or (saved if args.resume and saved.is_file() else None)
    base = file_values(RunConfig, source) if source else None
    return settings_from_args(RunConfig, args, base, skip=("data", "out"), data=args.data, out=args.out).validate()


def _train(args, first: str, last: str, teacher_file: str | None = None) -> dict:
    from ikdmil.methods import get_method

    cfg = _run_config(args)
    if not cfg.data:
        raise IkdmilError("no dataset given: pass DATA (a manifest CSV or dataset folder)")
    if cfg.method == "ikd":  # train / distill / run are IKD's phases
        options = {"first_phase": first, "last_phase": last, "teacher_file": teacher_file}
    elif (first, last) == ("teacher", "distill"):
        options = {}
    else:
        raise IkdmilError(f"--method {cfg.method}: `ikdmil {args.command}` runs a stage of IKD-MIL; train "
                          f"{cfg.method} with `ikdmil run DATA --method {cfg.method}`")
    check_output_folder(cfg.out)
    results = get_method(cfg.method).train(cfg, resume=args.resume, progress=_progress(args), **options)
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
    from ikdmil.data.manifest import load_samples, select_split
    from ikdmil.data.scale import scale_for_model
    from ikdmil.device import resolve_device
    from ikdmil.engine.evaluate import evaluate_model, write_overlays
    from ikdmil.io import write_text
    from ikdmil.models.checkpoint import load_model

    s = settings_from_args(EvaluateSettings, args).validate()
    out = _evaluation_folder(s.out or Path(args.model).parent / f"eval-{s.split}")
    device = resolve_device(s.device)
    model, meta = load_model(args.model, device)
    size = s.input_size or _model_input_size(args.model, meta)
    samples = select_split(load_samples(args.data), s.split, args.data, need_both=False)
    scale = scale_for_model(meta, samples, size)
    arrays = build_cache(samples, size, s.cache_dir or None, _progress(args), scale=scale)
    summary, scores, probs = evaluate_model(model, arrays, device, s.eval_sigma, s.threshold,
                                            progress=_progress(args), desc=f"evaluating {s.split}")
    names = [sample.image.stem for sample in samples]
    for score in scores:
        score["image"] = str(samples[score.pop("index")].image)
    result = {"model": str(args.model), "data": str(args.data), "split": s.split, "input_size": size,
              "scale": {**scale.meta(), "rule": scale.rule},
              "eval_sigma": s.eval_sigma, "threshold": s.threshold, "summary": summary, "patches": scores}
    n_over = write_overlays(out / "overlays", names, arrays, probs, s.eval_sigma, s.threshold, s.overlays)
    write_text(out / "results.json", json.dumps(result, indent=2))
    print(format_table({Path(args.model).stem: summary}))
    print(f"wrote {out / 'results.json'} and {n_over} overlays in {out / 'overlays'}")
    return 0


def _evaluation_folder(out) -> Path:
    """--out checked before any work; a training run's results.json is never replaced by evaluation's."""
    out = check_output_folder(out)
    results = out / "results.json"
    if results.is_file() and (out / "config.yaml").is_file():
        raise IkdmilError(f"--out {out}: holds a training run (config.yaml, results.json) whose results.json "
                          "evaluation would replace; choose another --out, e.g. RUN/eval-test")
    return out


def _model_input_size(model, meta: dict) -> int:
    try:
        size = coerce(meta.get("input_size", 256), int)
    except ValueError as exc:
        raise IkdmilError(f"{model}: metadata input_size: {exc}; pass --input-size") from None
    if size < 32:
        raise IkdmilError(f"{model}: metadata input_size {size} is below 32 px; pass --input-size")
    return size


def cmd_demo(args) -> int:
    from ikdmil.engine.loop import Timer
    from ikdmil.engine.pipeline import Pipeline
    from ikdmil.prepare.synth import make_synthetic_dataset

    timer = Timer()
    demo = settings_from_args(DemoSettings, args).validate()
    out = check_output_folder(demo.out)
    data, run = out / "data", out / "run"
    cfg = settings_from_args(RunConfig, args, DEMO_RUN_DEFAULTS, skip=DEMO_SKIP, data=str(data), out=str(run),
                             cache_dir=str(out / "cache")).validate()  # all checked before anything is written
    if run.exists() and not (run / "config.yaml").is_file():
        raise IkdmilError(f"{run}: exists and is not an ikdmil run; choose another --out")
    if not (data / "manifest.csv").is_file():
        make_synthetic_dataset(data, n=demo.n, seed=cfg.seed, size=demo.image_size, progress=_progress(args))
    if run.exists():
        shutil.rmtree(run)
    results = Pipeline(cfg, progress=_progress(args)).run()
    _demo_overlays(cfg, results, out / "overlays", demo.overlays)
    print()
    print(format_results(results))
    print(f"\ndemo finished in {timer():.0f} s; overlays in {out / 'overlays'}, run in {run}")
    return 0


def _demo_overlays(cfg: RunConfig, results: dict, folder: Path, limit: int) -> None:
    from ikdmil.data.dataset import build_cache
    from ikdmil.data.manifest import load_samples
    from ikdmil.data.scale import scale_for_model
    from ikdmil.device import resolve_device
    from ikdmil.engine.evaluate import predict_fused, write_overlays
    from ikdmil.models.checkpoint import load_model

    device = resolve_device(cfg.device)
    samples = [s for s in load_samples(cfg.data) if s.split == "test"]
    for role, entry in results["models"].items():
        model, meta = load_model(Path(cfg.out) / entry["file"], device)
        scale = scale_for_model(meta, samples, cfg.input_size)
        arrays = build_cache(samples, cfg.input_size, cfg.cache_dir, progress=False, scale=scale)
        probs = predict_fused(model, arrays, device)
        write_overlays(folder / role, [s.image.stem for s in samples], arrays, probs, cfg.eval_sigma,
                       cfg.threshold, limit)


# ------------------------------------------------------------------ output
def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(summaries: dict[str, dict]) -> str:
    head = (f"{'model':<10} {'F1':>6} {'IoU':>6} {'F1 pos':>7} {'F1 neg':>7} {'IoU pos':>8} {'HD':>7} {'HD95':>7} "
            f"{'HDpaper':>7} {'n':>4}")
    lines = [head, "-" * len(head)]
    for name, s in summaries.items():
        lines.append(
            f"{name:<10} {_fmt(s.get('f1')):>6} {_fmt(s.get('iou')):>6} {_fmt(s.get('f1_pos')):>7} "
            f"{_fmt(s.get('f1_neg')):>7} {_fmt(s.get('iou_pos')):>8} {_fmt(s.get('hd'), 1):>7} "
            f"{_fmt(s.get('hd95'), 1):>7} {_fmt(s.get('hd_paper'), 1):>7} {s.get('n', 0):>4}"
        )
    return "\n".join(lines)


def format_results(results: dict) -> str:
    tested = {role: e["test"] for role, e in results["models"].items() if "test" in e}
    lines = []
    if tested:
        lines.append("test split (HD in pixels at the model's input size; HDpaper: the authors' OpenCV measure):")
        lines.append(format_table(tested))
    for role, e in results["models"].items():
        vs = e.get("val_score")
        lines.append(f"{role}: validation {results['selection_metric']} = {_fmt(vs)}  ({e['file']})")
    if "selected" in results:
        swaps = f"; swaps: {results['swaps']}" if results.get("method", "ikd") == "ikd" else ""
        lines.append(f"selected on validation: {results['selected']} -> model.safetensors{swaps}")
    pm = results.get("pseudo_masks")
    if pm:
        f1 = "" if pm.get("val_f1") is None else f", validation F1 {_fmt(pm['val_f1'])}"
        lines.append(f"pseudo-masks ({pm['from']}): threshold {pm['threshold']:.2f} ({pm['threshold_rule']}){f1}")
    return "\n".join(lines)


# ------------------------------------------------------------------ parsers (one function per command)
def add_demo(sub, common) -> None:
    d = sub.add_parser("demo", parents=[common], formatter_class=HelpFormatter,
                       help="synthetic data -> teacher -> distillation -> table + overlays",
                       description="Generate the embedded synthetic H&E dataset, train the MIL teacher, distil the "
                                   "student through teacher/student swaps, evaluate both on the synthetic test split, "
                                   "print the table and write overlay PNGs. Defaults fit ~5 minutes on a 2-core CPU "
                                   "(a higher --lr than the paper's 5e-5, to converge in few epochs).")
    add_settings_options(d, DemoSettings)
    add_settings_options(d, RunConfig, skip=DEMO_SKIP, defaults=DEMO_RUN_DEFAULTS)
    d.set_defaults(func=cmd_demo)


def add_synth(sub, common) -> None:
    s = sub.add_parser("synth", parents=[common], formatter_class=HelpFormatter,
                       help="write a procedural H&E dataset with exact masks")
    s.add_argument("out", help="output folder ({train,val,test}/{pos,neg,masks} + manifest.csv)")
    s.add_argument("--n", type=number(int), default=240, help="number of images")
    s.add_argument("--seed", type=number(int), default=0)
    s.add_argument("--size", type=number(int), default=256, help="image size in pixels")
    s.set_defaults(func=cmd_synth)


PREPARE_USAGE = ("ikdmil prepare glas SRC OUT [options]\n"
                 "       ikdmil prepare camelyon16 SLIDES_DIR ANNOTATIONS_DIR OUT [options]\n"
                 "       ikdmil prepare digestpath IMAGES_DIR MASKS_DIR OUT [options]\n"
                 "       ikdmil prepare regions SLIDES LABELS OUT [options]")
PREPARE_DESCRIPTION = (
    "glas: official release or images/labels/index.csv. camelyon16: slides (tumor_*, normal_*, test_*) + ASAP XML "
    "annotations -> patches at level 1 (20x) with masks, positives from tumour slides and as many negatives from "
    "normal slides. digestpath: large images + *_mask images -> 1536 px crops, positive when the crop's mask has "
    "tumour. regions: slides + regions drawn in QuPath (GeoJSON exports, one per slide or a folder of them) or a "
    "CSV slide,x,y,w,h,label -> images at --mpp labelled by their region (Tumor=1, Normal=0; --classes maps other "
    "names); a Tumor region longer than --max-size is tiled and a tile is positive only when --min-tumour-overlap of "
    "it lies inside the outline. All write OUT/manifest.csv, OUT/{split}/{pos,neg,masks}/ and a summary JSON; "
    "camelyon16/digestpath/regions "
    "resume where they stopped when run again with the same options.")


def add_prepare(sub, common) -> None:
    from ikdmil.slide.tissue import TissueParams

    pr = sub.add_parser("prepare", parents=[common], formatter_class=HelpFormatter, usage=PREPARE_USAGE,
                        help="convert a public dataset into ikdmil's layout", description=PREPARE_DESCRIPTION)
    pr.add_argument("dataset", choices=["glas", "camelyon16", "digestpath", "regions"], help="dataset kind")
    pr.add_argument("src", help="GlaS folder | Camelyon16 slides folder | DigestPath images folder | "
                                "regions: slides folder (or one slide)")
    pr.add_argument("out", help="output folder (glas) | annotations folder (camelyon16) | masks folder (digestpath) | "
                                "regions: labels (QuPath .geojson file or folder, or a .csv)")
    pr.add_argument("extra", nargs="?", default=None, help="output folder (camelyon16, digestpath, regions)")
    fraction = number(float, min=0, below=1)
    pr.add_argument("--val-fraction", type=fraction, default=0.2,
                    help="share of train for validation: by patient (glas), by slide (camelyon16), "
                         "by image (digestpath); regions: share of slides")
    pr.add_argument("--test-fraction", type=fraction, default=0.2,
                    help="digestpath: share of images for test; regions: share of slides")
    pr.add_argument("--seed", type=number(int, min=0), default=0)
    _add_slide_dataset_options(pr.add_argument_group("camelyon16 / digestpath / regions"))
    from ikdmil.prepare.regions import RegionsOptions

    add_settings_options(pr.add_argument_group("regions (labels drawn in QuPath)"), RegionsOptions,
                         skip=REGIONS_SHARED, dest_prefix="regions.")
    group = pr.add_argument_group("tissue detection (saturation threshold + morphology on an overview)")
    add_settings_options(group, TissueParams, dest_prefix="tissue.", flag_prefix="tissue-")
    pr.set_defaults(func=cmd_prepare)


def _add_slide_dataset_options(g) -> None:
    share = number(float, min=0, max=1)
    g.add_argument("--patch-size", type=number(int, min=16), default=None,
                   help="patch side in px (camelyon16: 1280, digestpath: 1536, regions: 512, the tile side at "
                        "--mpp when a region is tiled)")
    g.add_argument("--level", type=number(int, min=0), default=1,
                   help="camelyon16: pyramid level to cut patches at (1 = 20x)")
    g.add_argument("--mpp", type=number(float, above=0), default=None,
                   help="camelyon16: cut patches at this µm/px instead of --level (read from the nearest finer level "
                        "and downsampled); digestpath: the images' µm/px, written to the manifest and used for tissue "
                        "detection (default 0.5, the nominal value of DigestPath 2019's 20x scans); regions: the "
                        "µm/px of the images written (default 0.5)")
    g.add_argument("--max-background", type=share, default=None,
                   help="drop patches with more background than this (0.8; regions too)")
    g.add_argument("--test-max-background", type=share, default=0.9,
                   help="camelyon16: the same rule for test-split positives (the paper's 90 %% rule)")
    g.add_argument("--min-tumour-fraction", type=number(float, min=0, below=1), default=0.0,
                   help="a patch is positive when its tumour fraction is above this")
    g.add_argument("--neg-ratio", type=number(float, min=0), default=1.0,
                   help="camelyon16: negatives per positive, per split")
    g.add_argument("--max-per-slide", type=number(int, min=0), default=0,
                   help="camelyon16: at most this many positives per slide (0 = all)")
    g.add_argument("--exclude", nargs="*", default=None, help="camelyon16: slide names to leave out (e.g. test_114)")
    g.add_argument("--exclusion-groups", default="_2,Exclusion",
                   help="camelyon16: annotation groups (comma-separated, any case) that cut holes in the tumour")
    g.add_argument("--reference", default=None,
                   help="camelyon16: test reference CSV (default: a reference.csv found under the two folders; "
                        "without one a test slide is tumour when it has an annotation)")
    g.add_argument("--image-format", choices=["png", "jpg"], default="png",
                   help="patch image format (masks: PNG; regions too)")


TRAINING_COMMANDS = (
    ("train", cmd_train, "stage 1: MIL teacher + fusion-weight fit -> teacher.safetensors"),
    ("run", cmd_run, "train + distill + test evaluation in one run folder (--method: IKD-MIL or a comparison row)"),
    ("distill", cmd_distill, "stage 2: iterative fusion-knowledge distillation from a teacher"),
)


def add_training_commands(sub, common) -> None:
    from ikdmil.methods import available_methods
    from ikdmil.models import available_backbones

    epilog = f"backbones: {', '.join(available_backbones())}; methods (--method): {', '.join(available_methods())}"
    for name, func, text in TRAINING_COMMANDS:
        t = sub.add_parser(name, parents=[common], formatter_class=HelpFormatter, help=text, description=text,
                           epilog=epilog)
        t.add_argument("data", nargs="?" if name != "distill" else None,
                       help="manifest CSV or dataset folder ({train,val,test}/{pos,neg,masks})")
        if name == "distill":
            t.add_argument("--teacher", required=True, help="teacher model (.safetensors from ikdmil train)")
            t.add_argument("--out", default=None, help="run folder (default: TEACHER's folder/distill)")
        else:
            t.add_argument("--out", default="runs/ikdmil", help="run folder (default: runs/ikdmil)")
        t.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in --out; only the epoch counts, --device, --workers, "
                            "--loader, --amp, --compile, --cache-dir and --track-test may differ from the run's")
        t.add_argument("--config", help="YAML config file; command-line options override it")
        add_settings_options(t, RunConfig, skip=("data", "out"))
        t.set_defaults(func=func, interrupted=RESUME_HINT)


def add_evaluate(sub, common) -> None:
    e = sub.add_parser("evaluate", parents=[common], formatter_class=HelpFormatter,
                       help="score a model on a split; write results.json + overlays")
    e.add_argument("model", help="model .safetensors (e.g. RUN/model.safetensors)")
    e.add_argument("data", help="manifest CSV or dataset folder")
    add_settings_options(e, EvaluateSettings)
    e.set_defaults(func=cmd_evaluate)


PREDICT_DESCRIPTION = (
    "Segment whole-slide images (SVS, NDPI, MRXS, tiled TIFF, ... via OpenSlide), large plain images and patch "
    "images. Per slide, OUT/NAME/ gets probability.tif and mask.tif (tiled pyramidal TIFFs with mpp, open in "
    "QuPath/OpenSlide), tumour.geojson (QuPath annotations in level-0 pixels), overlay.png, heatmap.png, tissue.png "
    "and summary.json; patch images get OUT/masks/NAME.png and OUT/overlays/NAME.png. OUT/predict_config.yaml "
    "records the settings. A failing input is reported and skipped; the exit status is then 1.")


def add_predict(sub, common) -> None:
    from ikdmil.inference.settings import PredictSettings

    pd = sub.add_parser(
        "predict", parents=[common], formatter_class=HelpFormatter, description=PREDICT_DESCRIPTION,
        help="segment slides / large images / patch images: TIFF maps, GeoJSON, overlays",
        epilog="Exit status: 0 all inputs done, 1 some inputs failed (one 'ikdmil: error:' line each), "
               "2 nothing could run (bad model, options, output folder).")
    pd.add_argument("model", help="model .safetensors (e.g. RUN/model.safetensors)")
    pd.add_argument("inputs", nargs="+", metavar="INPUT", help="slide or image files, or folders of them")
    pd.add_argument("--out", required=True, help="output folder")
    pd.add_argument("--config", default=None,
                    help="YAML with settings (e.g. a previous predict_config.yaml); options override it")
    add_settings_options(pd, PredictSettings)
    pd.set_defaults(func=cmd_predict, interrupted="run the same command again: finished slides are skipped")


def add_experiment(sub, common) -> None:
    from ikdmil.experiment import add_experiment_args

    x = sub.add_parser("experiment", parents=[common], formatter_class=HelpFormatter,
                       help="variants x seeds -> tables (mean ± std) + plots",
                       description="Run named variants x seeds on a prepared dataset, each in its own run folder "
                                   "(resumable), then write table.md/.csv/.json and plots/*.png in --out. "
                                   "-v shows every run's epochs and progress bars.")
    add_experiment_args(x)
    x.set_defaults(func=cmd_experiment, interrupted="run the same command again: finished runs are skipped")


def cmd_experiment(args) -> int:
    from ikdmil.experiment import run_experiment, settings_from_args

    settings = settings_from_args(args)
    table = run_experiment(settings)
    out = Path(settings.out)
    print()
    print((out / "table.md").read_text().rstrip())
    print(f"\n{table['runs_done']} run(s) in {table['seconds']:.0f} s; tables in {out}/table.{{md,csv,json}}, "
          f"{len(table.get('plots', []))} plot(s) in {out / 'plots'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ikdmil", description="Weakly-supervised tumour segmentation for H&E (IKD-MIL).")
    p.add_argument("--version", action="version", version=f"ikdmil {__version__}")
    add_verbosity_options(p, top=True)
    common = argparse.ArgumentParser(add_help=False)
    add_verbosity_options(common, top=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo, add_synth, add_prepare, add_training_commands, add_evaluate, add_predict, add_experiment):
        add(sub, common)
    return p


def _error(message: str) -> None:
    print("ikdmil: error: " + " ".join(message.split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except IkdmilError as exc:  # a bad option: one line, before anything runs
        _error(str(exc))
        return 2
    handler = configure_logging(args.quiet, args.verbose)
    try:
        return args.func(args)
    except IkdmilError as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "interrupted", None)
        print("ikdmil: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    finally:
        release_logging(handler)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # launched by torchrun
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
