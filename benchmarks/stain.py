"""How often predict's stain warning fires on real GlaS images, as they are and with their staining changed.

The training statistics come from the GlaS train split resized to --size (as training caches them);
each test image (testA + testB) is then measured the way predict measures a slide thumbnail (resized
--thumb-factor times smaller, its tissue by the tissue detector) with its haematoxylin / eosin
scaled by each pair of --shifts. Prints one JSON line per shift: the share of test images flagged
(largest z above `ikdmil.stain.STAIN_Z_WARN`) and the median and largest z.

    python benchmarks/stain.py --glas ../shared/data/glas
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ikdmil.slide.tissue import detect_tissue
from ikdmil.stain import STAIN_Z_WARN, scale_stains, slide_stats, stain_distance, training_stats

REPO = Path(__file__).resolve().parents[1]


def load(glas: Path, splits: tuple[str, ...]) -> list[np.ndarray]:
    with open(glas / "index.csv", newline="") as fh:
        names = [r["name"] for r in csv.DictReader(fh) if r["split"] in splits]
    return [np.asarray(Image.open(next((glas / "images").glob(n + ".*"))).convert("RGB")) for n in names]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glas", default=str(REPO.parent / "shared" / "data" / "glas"), help="GlaS folder (index.csv)")
    p.add_argument("--size", type=int, default=256, help="training images are resized to this (px)")
    p.add_argument("--thumb-factor", type=float, default=4.0, help="test images are measured this much smaller")
    p.add_argument("--shifts", default="1,1;0.5,1;0.7,1;1.5,1;2,1;1,0.5;1,2;1.5,1.5",
                   help="haematoxylin,eosin scale pairs separated by ';'")
    args = p.parse_args(argv)
    glas = Path(args.glas)
    if not (glas / "index.csv").is_file():
        print(f"{glas}: no index.csv; pass --glas", file=sys.stderr)
        return 2
    train = np.stack([np.asarray(Image.fromarray(im).resize((args.size, args.size), Image.Resampling.BILINEAR))
                      for im in load(glas, ("train",))])
    ref = training_stats(train)
    tests = load(glas, ("testA", "testB"))
    for pair in args.shifts.split(";"):
        h, e = (float(v) for v in pair.split(","))
        zs = []
        for im in tests:
            small = Image.fromarray(scale_stains(im, h, e))
            small = np.asarray(small.resize((round(im.shape[1] / args.thumb_factor),
                                             round(im.shape[0] / args.thumb_factor)), Image.Resampling.BILINEAR))
            tissue, _ = detect_tissue(small, 0.62 * args.thumb_factor)
            zs.append(max(stain_distance(slide_stats(small, tissue), ref)))
        print(json.dumps({"haematoxylin": h, "eosin": e, "images": len(zs), "threshold": STAIN_Z_WARN,
                          "flagged": round(float(np.mean(np.array(zs) > STAIN_Z_WARN)), 3),
                          "median_z": round(float(np.median(zs)), 2), "max_z": round(float(np.max(zs)), 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
