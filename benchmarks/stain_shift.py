"""Test scores of a trained model on stain-shifted images, with and without predict's stain normalisation.

Each test image (at the model's scale, as `ikdmil evaluate` reads it) gets its haematoxylin / eosin
scaled by each pair of --shifts (`ikdmil.stain.scale_stains`; the defaults lie outside the range
--stain-augment 0.05 draws: x0.6 and x1.6 are 8 of its standard deviations away), then is scored as
it is (`none`) and after normalisation onto the model file's reference (`reinhard`, `macenko`: each
image by its own statistics, as `predict` treats a patch). `--reference train` measures the references
on the dataset's train split at the model's scale instead, as training does (for model files written
before a method existed). Prints one JSON line per shift and method: F1 and IoU over the split, as
`ikdmil evaluate` computes them. Given several models (e.g. one per seed), it then prints one
``"summary"`` line per shift and method: mean and sample std of F1 and IoU over the models.

    ikdmil prepare glas ../shared/data/glas data/glas
    python benchmarks/stain_shift.py runs/stain-aug/model.safetensors data/glas --split test
    python benchmarks/stain_shift.py runs/exp/vgg16/teacher/seed*/teacher.safetensors data/glas --reference train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

from ikdmil.errors import IkdmilError

DEFAULT_SHIFTS = "1,1;0.6,1;1.6,1;1,0.6;1,1.6;1.6,0.6;0.6,1.6"


def shifted_arrays(arrays, h: float, e: float, reference=None):
    """A copy of the split's arrays with every image's stains scaled (then normalised onto `reference`)."""
    from ikdmil.inference.predict import normalise_patch
    from ikdmil.stain import scale_stains

    images = np.array(arrays.images)
    for i in range(len(images)):
        valid = arrays.valid(i, images[i])
        if (h, e) != (1.0, 1.0):
            valid[...] = scale_stains(valid, h, e)
        if reference is not None:
            valid[...] = normalise_patch(valid, reference)
    return dataclasses.replace(arrays, images=images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="+", help="model file(s) (.safetensors) written by ikdmil train / run")
    p.add_argument("data", help="prepared dataset folder or manifest (ikdmil prepare glas SRC OUT)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--shifts", default=DEFAULT_SHIFTS, help="haematoxylin,eosin scale pairs separated by ';'")
    p.add_argument("--normalise", default="none,reinhard,macenko", help="comma-separated: none, reinhard, macenko")
    p.add_argument("--reference", default="model", choices=("model", "train"),
                   help="normalisation references: the model file's, or measured on the train split")
    p.add_argument("--eval-sigma", type=float, default=3.0)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default="")
    args = p.parse_args(argv)
    try:
        for line in run(args):
            print(json.dumps(line), flush=True)
    except IkdmilError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


def run(args):
    """Each model's lines, then (several models) the summary lines."""
    methods = [m.strip() for m in args.normalise.split(",") if m.strip()]
    from ikdmil.stain import NORMALISE

    if not set(methods) <= set(NORMALISE):
        raise IkdmilError(f"--normalise {args.normalise!r}: give some of {', '.join(NORMALISE)}, separated by commas")
    pairs = [tuple(float(v) for v in pair.split(",")) for pair in args.shifts.split(";")]
    lines = []
    for model in args.model:
        for line in run_model(args, model, methods, pairs):
            lines.append(line)
            yield line
    if len(args.model) > 1:
        for h, e in pairs:
            for method in methods:
                rows = [r for r in lines if (r["haematoxylin"], r["eosin"], r["normalise"]) == (h, e, method)]
                out = {"summary": True, "split": args.split, "haematoxylin": h, "eosin": e, "normalise": method,
                       "models": len(rows)}
                for k in ("f1", "iou"):
                    values = np.array([r[k] for r in rows], np.float64)
                    out[f"{k}_mean"], out[f"{k}_std"] = float(values.mean()), float(values.std(ddof=1))
                yield out


def run_model(args, model_path: str, methods: list[str], pairs: list[tuple[float, float]]):
    from ikdmil.data.dataset import build_cache
    from ikdmil.data.manifest import load_samples, select_split
    from ikdmil.data.scale import scale_for_model
    from ikdmil.device import resolve_device
    from ikdmil.engine.evaluate import predict_fused, score_predictions
    from ikdmil.inference.settings import DEFAULT_MODEL_MPP
    from ikdmil.models.checkpoint import load_model
    from ikdmil.stain import reference_from_meta, training_references

    device = resolve_device(args.device)
    model, meta = load_model(model_path, device)
    size = int(meta.get("input_size", 256))
    samples = load_samples(args.data)
    split = select_split(samples, args.split, args.data, need_both=False)
    scale = scale_for_model(meta, split, size)
    arrays = build_cache(split, size, args.cache_dir or None, False, scale=scale)
    if args.reference == "train":
        train = build_cache(select_split(samples, "train", args.data, need_both=False), size, args.cache_dir or None,
                            False, scale=scale)
        meta = {"stain": training_references(train.images, scale.mpp if scale.mpp > 0 else DEFAULT_MODEL_MPP)}
    references = {m: reference_from_meta(meta, model_path, m) for m in methods if m != "none"}
    for h, e in pairs:
        for method in methods:
            shifted = shifted_arrays(arrays, h, e, references.get(method))
            probs = predict_fused(model, shifted, device, amp=True)
            summary, _ = score_predictions(probs, shifted, args.eval_sigma, args.threshold, distances=False)
            yield {"model": str(model_path), "split": args.split, "haematoxylin": h, "eosin": e,
                   "normalise": method, "images": summary.get("n"), "f1": summary.get("f1"),
                   "iou": summary.get("iou")}


if __name__ == "__main__":
    raise SystemExit(main())
