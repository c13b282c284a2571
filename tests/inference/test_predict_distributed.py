"""Cohort prediction under torchrun: slides shared by size between ranks, one merged index, resumable."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from fakes.slides import painted_slide, vgg_model, write_slide
from PIL import Image

from ikdmil.cli import main
from ikdmil.inference import shard_by_size
from ikdmil.slide.reader import level0_area

SIZES = [(420, 300), (300, 260), (260, 200), (200, 160)]  # level-0 (w, h) of the four slides


def test_shard_by_size_puts_every_index_on_one_rank_largest_first():
    sizes = [7, 3, 9, 1, 4, 4, 2]
    shares = shard_by_size(sizes, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
    assert shares == [[2, 3], [0, 1], [4, 5, 6]]  # 9+1 | 7+3 | 4+4+2: longest first onto the least-loaded rank
    assert shares == shard_by_size(sizes, 3)  # the same on every call (and so on every rank)
    assert all(s == sorted(s) for s in shares)  # each rank keeps the input order
    assert shard_by_size(sizes, 1) == [list(range(len(sizes)))]
    assert shard_by_size([5, 5], 4) == [[0], [1], [], []]
    assert shard_by_size([0, 0, 0, 0], 2) == [[0, 2], [1, 3]]  # done slides weigh nothing, still shared


def test_level0_area_reads_the_header_of_slides_and_plain_images(tmp_path):
    img, _ = painted_slide(np.random.default_rng(0), (130, 70), tissue=[], tumour=[])
    assert level0_area(write_slide(tmp_path / "s.tif", img, levels=2)) == 130 * 70
    Image.fromarray(img).save(tmp_path / "p.png")
    assert level0_area(tmp_path / "p.png") == 130 * 70
    (tmp_path / "bad.svs").write_bytes(b"not a slide")
    assert level0_area(tmp_path / "bad.svs") == 0


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "ikdmil", "predict", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_two_ranks_share_the_slides_and_rank_0_writes_the_index(tmp_path, capsys):
    rng = np.random.default_rng(1)
    slides = []
    for n, (w, h) in enumerate(SIZES):
        img, _ = painted_slide(rng, (w, h), tissue=[(10, 10, w - 20, h - 20)], tumour=[(20, 20, w // 3, h // 3)])
        slides.append(write_slide(tmp_path / "slides" / f"s{n}.tif", img, mpp=0.5, tile=64, levels=2))
    Image.fromarray(img[:40, :40]).save(tmp_path / "slides" / "patch.png")  # a patch image, shared too
    model = vgg_model(tmp_path / "m.safetensors", input_size=32)
    out = tmp_path / "out"
    args = [str(model), str(tmp_path / "slides"), "--out", str(out), "--model-mpp", "1.0", "--all-tissue",
            "--sigma", "0", "--device", "cpu", "--workers", "0"]
    proc = _torchrun(args, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("4 slides segmented, 0 already done, 1 patch images") == 1  # rank 0 reports for all

    index = json.loads((out / "predict_summary.json").read_text())
    entries = {e["folder"]: e for e in index["slides"]}
    assert sorted(entries) == ["s0", "s1", "s2", "s3"] and index["failures"] == []
    assert all(e["status"] == "done" for e in entries.values())
    shares = shard_by_size([w * h for w, h in SIZES], 2)  # [[0, 3], [1, 2]]: areas 158k vs 130k px
    assert {f"s{i}": r for r, share in enumerate(shares) for i in share} == {k: e["rank"] for k, e in entries.items()}
    for name in entries:
        assert json.loads((out / name / "summary.json").read_text())["tiles"] > 0
    assert len(list(out.glob("predict_config*.yaml"))) == 1
    assert [e["image"] for e in json.loads((out / "patches.json").read_text())["images"]] == [
        str(tmp_path / "slides" / "patch.png")]

    marks = {name: (out / name / "summary.json").stat().st_mtime_ns for name in entries}
    code = main(["predict", *args, "--quiet"])  # another world size: everything is already done
    assert code == 0 and "0 slides segmented, 4 already done" in capsys.readouterr().out
    again = _torchrun(args, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("0 slides segmented, 4 already done") == 1
    assert marks == {name: (out / name / "summary.json").stat().st_mtime_ns for name in entries}
    index = json.loads((out / "predict_summary.json").read_text())
    assert sorted(e["folder"] for e in index["slides"]) == ["s0", "s1", "s2", "s3"]
    assert {e["status"] for e in index["slides"]} == {"skipped"}
    # done slides weigh nothing, so they are dealt out in turn rather than by area as in the first run
    assert {e["folder"]: e["rank"] for e in index["slides"]} == {"s0": 0, "s1": 1, "s2": 0, "s3": 1}
