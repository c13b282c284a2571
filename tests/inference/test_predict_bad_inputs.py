"""`ikdmil predict` as a user who makes mistakes would run it (issue 13), through the real command line.

Every case asserts the exit status (1: that input failed, the others went on; 2: nothing could run;
130: interrupted), that each error is one ``ikdmil: error:`` line naming the file or option (no
traceback), and that nothing outside the output folder changed (checksums of every file under the
test's folder, and of folders of the user's that sit inside OUT).

Classes: data loss (folders predict did not write), index files (later and concurrent runs),
temporary files, plausibility, messages, large plain images.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fakes.slides import dark_backbone, dark_detector_model, painted_slide, png_header, write_slide
from PIL import Image

from ikdmil.cli import main
from ikdmil.inference import PredictSettings, predict
from ikdmil.inference.outputs import MARKER
from ikdmil.io import MAX_PIXELS_ENV, owner_tag

SIZE = (200, 160)  # level-0 px at 0.5 µm/px = model resolution: 4 x 3 tiles of 64 px


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_predict")
    img, _ = painted_slide(np.random.default_rng(0), SIZE, tissue=[(10, 10, 180, 140)], tumour=[(40, 40, 60, 50)])
    with dark_backbone():
        yield {"model": dark_detector_model(root / "dark.safetensors"), "image": img, "root": root}


# ------------------------------------------------------------------------------------------------ helpers


def slide(folder: Path, name: str, image: np.ndarray) -> Path:
    return write_slide(folder / name, image, mpp=0.5, tile=64, levels=1)


def patch(folder: Path, name: str, dark: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", (48, 40), (95, 45, 130) if dark else (225, 160, 200)).save(path)
    return path


def cli(capsys, model, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["predict", str(model), *map(str, args), "--workers", "0", "--quiet"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_lines(rc: int, err: str, expected_rc: int, names: list[str], hints: list[str] = ()) -> list[str]:
    """The ``ikdmil: error:`` lines, after checking the exit status and that stderr holds nothing else."""
    assert rc == expected_rc, err
    assert "Traceback" not in err and "Errno" not in err, err
    lines = err.strip().splitlines()
    assert all(line.startswith("ikdmil: ") for line in lines), err
    errors = [line for line in lines if line.startswith("ikdmil: error: ")]
    assert errors, err
    if expected_rc == 2:
        assert len(lines) == 1, err
    for name in names:
        assert any(name in line for line in errors), f"{name!r} not named in {errors}"
    for hint in hints:
        assert any(hint in line.lower() for line in errors), f"no {hint!r} in {errors}"
    return errors


def checksum(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file, link and folder under `root` (links not followed) -> its content hash / target."""
    found = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        if skip is not None and (here == skip or skip in here.parents):
            dirs[:] = []
            continue
        for name in dirs + files:
            p = here / name
            if skip is not None and p == skip:
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path}: holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def assert_indexes_consistent(out: Path) -> dict:
    """predict_summary.json and patches.json are valid JSON and list exactly what is on disk."""
    summary = strict_json(out / "predict_summary.json")
    folders = sorted(p.name for p in out.iterdir() if (p / MARKER).is_file() and (p / "summary.json").is_file()
                     and json.loads((p / MARKER).read_text())["kind"] == "slide")
    assert sorted(s["folder"] for s in summary["slides"]) == folders
    if (out / "patches.json").exists():
        images = strict_json(out / "patches.json")["images"]
        assert all((out / "masks" / f"{Path(e['image']).stem}.png").is_file() for e in images)
        assert summary["patches"] == len(images)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left behind"
    return summary


# ------------------------------------------------------------------------------- data loss (issue 13.1)


def _user_folder(out: Path, elsewhere: Path) -> Path:
    (out / "case").mkdir(parents=True)
    (out / "case" / "notes.txt").write_text("my notes\n")
    return out / "case"


def _user_file(out: Path, elsewhere: Path) -> Path:
    out.mkdir(parents=True)
    (out / "case").write_text("a file, not a folder\n")
    return out / "case"


def _symlink(out: Path, elsewhere: Path) -> Path:
    elsewhere.mkdir(parents=True)
    (elsewhere / "notes.txt").write_text("my notes\n")
    out.mkdir(parents=True)
    (out / "case").symlink_to(elsewhere, target_is_directory=True)
    return out / "case"


def _other_marker(out: Path, elsewhere: Path) -> Path:  # patch masks of an earlier run in a folder named "case"
    (out / "case").mkdir(parents=True)
    (out / "case" / "p.png").write_bytes(b"\x89PNG")
    (out / "case" / MARKER).write_text(json.dumps({"kind": "masks"}))
    return out / "case"


def _state(p: Path):
    if p.is_symlink():
        return "link:" + os.readlink(p)
    return checksum(p) if p.is_dir() else p.read_bytes()


@pytest.mark.parametrize("make, hint", [(_user_folder, "not written by ikdmil predict"),
                                        (_user_file, "is a file"),
                                        (_symlink, "symbolic link"),
                                        (_other_marker, "patch masks")],
                         ids=["user-folder", "user-file", "symlink", "other-kind-of-output"])
def test_a_folder_predict_did_not_write_is_never_replaced(world, tmp_path, capsys, make, hint):
    inputs = tmp_path / "in"
    slide(inputs, "case.tif", world["image"])
    slide(inputs, "other.tif", world["image"])
    out = tmp_path / "OUT"
    theirs = make(out, tmp_path / "elsewhere")
    before, before_theirs = checksum(tmp_path, skip=out), _state(theirs)
    rc, _, err = cli(capsys, world["model"], inputs, "--out", out)
    (line,) = error_lines(rc, err, 1, [str(out / "case")], [hint])
    assert "choose another --out" in line or "rename" in line
    assert _state(theirs) == before_theirs
    assert checksum(tmp_path, skip=out) == before  # the inputs, and what the link points to
    assert (out / "other" / "summary.json").is_file()  # the others went on
    summary = assert_indexes_consistent(out)
    assert [f["input"] for f in summary["failures"]] == [str(inputs / "case.tif")]


def test_a_predict_folder_the_user_added_a_file_to_is_not_replaced(world, tmp_path, capsys):
    inputs = tmp_path / "in"
    slide(inputs, "case.tif", world["image"])
    out = tmp_path / "OUT"
    assert cli(capsys, world["model"], inputs, "--out", out)[0] == 0
    (out / "case" / "my_annotations.geojson").write_text("{}")
    before = checksum(out / "case")
    rc, _, err = cli(capsys, world["model"], inputs, "--out", out, "--overwrite")
    error_lines(rc, err, 1, [str(out / "case"), "my_annotations.geojson"], ["did not write"])
    assert checksum(out / "case") == before
    (out / "case" / "my_annotations.geojson").unlink()  # without it, the folder is predict's again
    rc, _, err = cli(capsys, world["model"], inputs, "--out", out, "--threshold", "0.7")
    assert rc == 0, err
    assert json.loads((out / "case" / "summary.json").read_text())["threshold"] == 0.7


def test_a_slide_named_masks_keeps_earlier_patch_masks(world, tmp_path, capsys):
    inputs = tmp_path / "in"
    patch(inputs / "patches", "p1.png")
    out = tmp_path / "OUT"
    assert cli(capsys, world["model"], inputs / "patches", "--out", out)[0] == 0
    before = checksum(out / "masks")
    slide(inputs, "masks.tif", world["image"])
    rc, _, err = cli(capsys, world["model"], inputs / "masks.tif", "--out", out)
    error_lines(rc, err, 1, [str(out / "masks")], ["patch masks", "rename the slide"])
    assert checksum(out / "masks") == before
    assert_indexes_consistent(out)  # patches.json still lists only files that exist


@pytest.mark.parametrize("owner", ["user", "slide"])
def test_patch_images_never_write_into_a_masks_folder_predict_did_not_make_for_them(world, tmp_path, capsys, owner):
    inputs = tmp_path / "in"
    patch(inputs, "p1.png")
    out = tmp_path / "OUT"
    if owner == "user":
        (out / "masks").mkdir(parents=True)
        Image.new("L", (8, 8)).save(out / "masks" / "p1.png")  # same name as the patch's mask would have
    else:  # a slide called "masks" segmented earlier
        slide(inputs / "slides", "masks.tif", world["image"])
        assert cli(capsys, world["model"], inputs / "slides", "--out", out)[0] == 0
    before = checksum(out / "masks")
    before_outside = checksum(tmp_path, skip=out)
    rc, _, err = cli(capsys, world["model"], inputs / "p1.png", "--out", out)
    error_lines(rc, err, 1, [str(out / "masks")], ["another --out"])
    assert checksum(out / "masks") == before and checksum(tmp_path, skip=out) == before_outside
    assert not (out / "overlays").exists()


# ------------------------------------------------------------------------------- index files (issue 13.2)


def test_a_second_run_adds_to_the_index_files(world, tmp_path, capsys):
    inputs = tmp_path / "in"
    a = slide(inputs, "a.tif", world["image"])
    b = slide(inputs, "b.tif", world["image"])
    p1, p2 = patch(inputs, "p1.png"), patch(inputs, "p2.png", dark=False)
    out = tmp_path / "OUT"
    assert cli(capsys, world["model"], a, p1, "--out", out)[0] == 0
    assert cli(capsys, world["model"], b, p2, "--out", out)[0] == 0
    summary = assert_indexes_consistent(out)
    assert [s["slide"] for s in summary["slides"]] == ["a.tif", "b.tif"] and summary["patches"] == 2
    images = strict_json(out / "patches.json")["images"]
    assert [Path(e["image"]).name for e in images] == ["p1.png", "p2.png"]
    assert images[0]["tumour_fraction"] == 1.0 and images[1]["tumour_fraction"] == 0.0
    import yaml

    cfg = yaml.safe_load((out / "predict_config.yaml").read_text())  # same settings: one file, all inputs
    assert cfg["inputs"] == [str(p.resolve()) for p in (a, p1, b, p2)]
    assert not (out / "predict_config-2.yaml").exists()


def test_a_run_with_other_settings_gets_its_own_config_file(world, tmp_path, capsys):
    inputs = tmp_path / "in"
    a, b = slide(inputs, "a.tif", world["image"]), slide(inputs, "b.tif", world["image"])
    out = tmp_path / "OUT"
    assert cli(capsys, world["model"], a, "--out", out)[0] == 0
    first = (out / "predict_config.yaml").read_bytes()
    rc, stdout, _ = cli(capsys, world["model"], b, "--out", out, "--threshold", "0.7")
    assert rc == 0 and "predict_config-2.yaml" in stdout
    assert (out / "predict_config.yaml").read_bytes() == first  # never rewritten with other settings
    import yaml

    second = yaml.safe_load((out / "predict_config-2.yaml").read_text())
    assert second["settings"]["threshold"] == 0.7 and second["inputs"] == [str(b.resolve())]
    summary = assert_indexes_consistent(out)
    assert [(s["slide"], s["config"]) for s in summary["slides"]] == [("a.tif", "predict_config.yaml"),
                                                                      ("b.tif", "predict_config-2.yaml")]
    # the recorded file reproduces its run: --config gives the same settings, so no third file
    rc, stdout, _ = cli(capsys, world["model"], b, "--out", out, "--config", out / "predict_config-2.yaml")
    assert rc == 0 and "1 already done" in stdout and not (out / "predict_config-3.yaml").exists()


def _quiet_settings(**kw) -> PredictSettings:
    return PredictSettings(workers=0, **kw)


def test_a_run_that_finishes_last_keeps_what_a_concurrent_run_wrote(world, tmp_path):
    """Run A is held after its first slide while run B runs from start to end into the same OUT."""
    inputs = tmp_path / "in"
    a1, a2 = slide(inputs, "a1.tif", world["image"]), slide(inputs, "a2.tif", world["image"])
    b1, pb = slide(inputs, "b1.tif", world["image"]), patch(inputs, "pb.png")
    out = tmp_path / "OUT"
    b_done, errors = threading.Event(), []

    def hold_a(line: str) -> None:
        if "a1.tif" in line:
            assert b_done.wait(60)

    def run(paths, echo, **kw):
        try:
            predict(world["model"], paths, out, _quiet_settings(**kw), progress=False, echo=echo)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    t = threading.Thread(target=run, args=([a1, a2], hold_a))
    t.start()
    run([b1, pb], lambda line: None, threshold=0.6)
    b_done.set()
    t.join(60)
    assert not errors and not t.is_alive()
    summary = assert_indexes_consistent(out)
    assert [s["slide"] for s in summary["slides"]] == ["a1.tif", "a2.tif", "b1.tif"] and summary["patches"] == 1


def test_two_concurrent_runs_into_one_out_leave_consistent_index_files(world, tmp_path):
    inputs = tmp_path / "in"
    names = {"x": ["x1.tif", "x2.tif", "shared.tif"], "y": ["y1.tif", "shared.tif"]}
    paths = {k: [slide(inputs, n, world["image"]) if not (inputs / n).exists() else inputs / n for n in v]
             for k, v in names.items()}
    paths["x"].append(patch(inputs, "px.png"))
    paths["y"].append(patch(inputs, "py.png", dark=False))
    out = tmp_path / "OUT"
    start, errors = threading.Barrier(2), []

    def run(key, **kw):
        try:
            start.wait(30)
            predict(world["model"], paths[key], out, _quiet_settings(**kw), progress=False, echo=lambda line: None)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("x",)), threading.Thread(target=run, args=("y",),
                                                                            kwargs={"threshold": 0.6})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    summary = assert_indexes_consistent(out)
    assert [s["slide"] for s in summary["slides"]] == ["shared.tif", "x1.tif", "x2.tif", "y1.tif"]
    assert summary["failures"] == [] and summary["patches"] == 2
    import yaml

    configs = [yaml.safe_load((out / n).read_text()) for n in ("predict_config.yaml", "predict_config-2.yaml")]
    assert sorted(c["settings"]["threshold"] for c in configs) == [0.5, 0.6]
    assert sorted(len(c["inputs"]) for c in configs) == [3, 4]


def test_a_later_success_clears_the_failure_and_a_later_failure_keeps_the_outputs(world, tmp_path, capsys):
    inputs = tmp_path / "in"
    nompp = write_slide(inputs / "nompp.tif", world["image"], mpp=None, tile=64, levels=1)
    out = tmp_path / "OUT"
    assert cli(capsys, world["model"], nompp, "--out", out)[0] == 1
    assert [f["input"] for f in assert_indexes_consistent(out)["failures"]] == [str(nompp)]
    assert cli(capsys, world["model"], nompp, "--out", out, "--mpp", "0.5")[0] == 0
    summary = assert_indexes_consistent(out)
    assert summary["failures"] == [] and [s["slide"] for s in summary["slides"]] == ["nompp.tif"]
    before = checksum(out / "nompp")
    assert cli(capsys, world["model"], nompp, "--out", out, "--threshold", "0.7")[0] == 1  # no mpp again
    summary = assert_indexes_consistent(out)
    assert len(summary["failures"]) == 1 and [s["slide"] for s in summary["slides"]] == ["nompp.tif"]
    assert checksum(out / "nompp") == before


def test_an_interrupted_batch_lists_its_finished_slides_and_says_run_again(world, tmp_path, capsys, monkeypatch):
    driver = importlib.import_module("ikdmil.inference.predict")  # (the package exports a function of that name)

    inputs = tmp_path / "in"
    for n in ("a.tif", "b.tif"):
        slide(inputs, n, world["image"])
    real, calls = driver.predict_slide, []

    def interrupt_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(driver, "predict_slide", interrupt_second)
    out = tmp_path / "OUT"
    rc, _, err = cli(capsys, world["model"], inputs, "--out", out)
    assert rc == 130 and err.strip().splitlines() == [
        "ikdmil: interrupted; run the same command again: finished slides are skipped"]
    assert "--resume" not in err
    assert [s["slide"] for s in assert_indexes_consistent(out)["slides"]] == ["a.tif"]


# --------------------------------------------------------------------------- temporary files (issue 13.8)


def test_temporaries_of_killed_runs_are_removed_and_those_of_live_runs_kept(world, tmp_path, capsys):
    inputs = tmp_path / "in"
    slide(inputs, "a.tif", world["image"])
    p = patch(inputs, "p.png")
    out = tmp_path / "OUT"
    (out / "masks").mkdir(parents=True)
    host = owner_tag().rsplit("-", 1)[0]
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = out / f".a.tmp-{host}-{dead.pid}-x1"
        stale.mkdir()
        np.memmap(stale / ".probability.u8", np.uint8, "w+", shape=(64, 64)).flush()
        stale_png = out / "masks" / f".p.png.tmp-{host}-{dead.pid}-y2.png"
        stale_png.write_bytes(b"half a png")
        kept = out / f".b.tmp-{host}-{live.pid}-z3"
        kept.mkdir()
        other_host = out / f".c.tmp-otherhost-{dead.pid}-w4"
        other_host.mkdir()
        rc, _, err = cli(capsys, world["model"], inputs / "a.tif", p, "--out", out)
        assert rc == 0, err
        assert not stale.exists() and not stale_png.exists()
        assert kept.is_dir() and other_host.is_dir()
    finally:
        live.kill()
        live.wait()


def test_an_interrupt_inside_a_slide_leaves_no_temporary_and_no_half_folder(world, tmp_path, capsys, monkeypatch):
    import ikdmil.inference.slide as one

    def interrupt(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(one, "write_annotations", interrupt)  # after the maps, before the folder is renamed
    inputs = tmp_path / "in"
    slide(inputs, "a.tif", world["image"])
    out = tmp_path / "OUT"
    rc, _, err = cli(capsys, world["model"], inputs, "--out", out)
    assert rc == 130 and "--resume" not in err and "run the same command again" in err
    assert not (out / "a").exists() and not [q for q in out.iterdir() if ".tmp-" in q.name]


# ------------------------------------------------------------------------------ plausibility (issue 13.9)


def _empty_png_mask(folder: Path) -> Path:
    Image.new("L", (50, 40), 0).save(folder / "mask.png")
    return folder / "mask.png"


def _geojson_outside(folder: Path) -> Path:
    far = [[5000, 5000], [6000, 5000], [6000, 6000], [5000, 6000], [5000, 5000]]
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [far]}, "properties": {}}]}
    (folder / "mask.geojson").write_text(json.dumps(fc))
    return folder / "mask.geojson"


def _mask_bomb(folder: Path) -> Path:
    return png_header(folder / "mask.png", 40000, 32000, zlib.compress(b"\0" * 1000))


@pytest.mark.parametrize("make, hints", [(_empty_png_mask, ["no tissue", "--tissue-mask"]),
                                         (_geojson_outside, ["no tissue", "--tissue-mask"]),
                                         (_mask_bomb, ["limit", MAX_PIXELS_ENV.lower()])],
                         ids=["all-zero-image", "geojson-outside", "huge-header"])
def test_a_tissue_mask_that_marks_nothing_fails_the_slide(world, tmp_path, capsys, make, hints):
    inputs = tmp_path / "in"
    s = slide(inputs, "a.tif", world["image"])
    mask = make(inputs)
    out = tmp_path / "OUT"
    before = checksum(tmp_path, skip=out)
    rc, _, err = cli(capsys, world["model"], s, "--out", out, "--tissue-mask", mask)
    error_lines(rc, err, 1, [str(mask)], hints)
    assert not (out / "a").exists() and checksum(tmp_path, skip=out) == before
    assert_indexes_consistent(out)


@pytest.mark.parametrize("case", ["blank-slide", "min-tissue"])
def test_a_slide_without_tiles_to_run_fails_instead_of_reporting_zero_tiles(world, tmp_path, capsys, case):
    inputs = tmp_path / "in"
    if case == "blank-slide":
        img, _ = painted_slide(np.random.default_rng(1), SIZE, tissue=[], tumour=[])
        extra, hint = [], "--all-tissue"
    else:
        img, _ = painted_slide(np.random.default_rng(1), SIZE, tissue=[(70, 50, 40, 40)], tumour=[])
        extra, hint = ["--min-tissue", "0.95", "--tissue-min-object-um2", "0"], "--min-tissue"
    s = slide(inputs, "a.tif", img)
    rc, _, err = cli(capsys, world["model"], s, "--out", tmp_path / "OUT", *extra)
    error_lines(rc, err, 1, [str(s)], [hint])
    assert not (tmp_path / "OUT" / "a").exists()


@pytest.mark.parametrize("weight", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_model_with_non_finite_weights_is_refused_before_any_work(world, tmp_path, capsys, weight):
    model = dark_detector_model(tmp_path / "diverged.safetensors", weight=weight)
    inputs = tmp_path / "in"
    p = patch(inputs, "p.png")
    rc, _, err = cli(capsys, model, p, "--out", tmp_path / "OUT")
    error_lines(rc, err, 2, [str(model), "side_heads.0.weight"], ["nan or infinite"])
    assert not (tmp_path / "OUT").exists()


def test_non_finite_model_outputs_never_reach_a_json_file(world, tmp_path, capsys, monkeypatch):
    import ikdmil.inference.model as inference_model

    real = inference_model.fused_forward
    monkeypatch.setattr(inference_model, "fused_forward", lambda *a, **k: real(*a, **k) * float("nan"))
    inputs = tmp_path / "in"
    s, p = slide(inputs, "a.tif", world["image"]), patch(inputs, "p.png")
    out = tmp_path / "OUT"
    rc, _, err = cli(capsys, world["model"], s, p, "--out", out, "--backend", "torch")  # the patched forward
    errors = error_lines(rc, err, 1, [str(world["model"])], ["nan or infinite"])
    assert len(errors) == 2 and str(s) in err
    assert not (out / "a").exists() and [q.name for q in (out / "masks").iterdir()] == [MARKER]
    summary = assert_indexes_consistent(out)
    assert len(summary["failures"]) == 2


@pytest.mark.parametrize("args, option", [
    (["--mpp", "1000"], "--mpp"), (["--mpp", "40"], "--mpp"), (["--mpp", "nan"], "--mpp"),
    (["--mpp", "0"], "--mpp"), (["--mpp", "-1"], "--mpp"), (["--model-mpp", "inf"], "--model-mpp"),
    ("config:mpp: 1000", "mpp"), ("config:tile_size: -5", "tile_size"),
], ids=["mpp-1000", "mpp-40", "mpp-nan", "mpp-0", "mpp-negative", "model-mpp-inf", "config-mpp", "config-tile"])
def test_implausible_resolutions_fail_fast_naming_the_option(world, tmp_path, capsys, args, option):
    inputs = tmp_path / "in"
    s = slide(inputs, "a.tif", world["image"])
    if isinstance(args, str):
        cfg = tmp_path / "settings.yaml"
        cfg.write_text(args.split(":", 1)[1].strip() + "\n")
        args = ["--config", str(cfg)]
    before = checksum(tmp_path)
    t0 = time.perf_counter()
    rc, _, err = cli(capsys, world["model"], s, "--out", tmp_path / "OUT", *args)
    assert time.perf_counter() - t0 < 10
    error_lines(rc, err, 2, [option])
    assert checksum(tmp_path) == before  # OUT not even created


@pytest.mark.parametrize("args", [["--mpp", "20"], ["--model-mpp", "0.05"]], ids=["mpp-20", "model-mpp-0.05"])
def test_a_slide_that_would_be_enlarged_implausibly_fails_fast(world, tmp_path, capsys, args):
    s = slide(tmp_path / "in", "a.tif", world["image"])
    t0 = time.perf_counter()
    rc, _, err = cli(capsys, world["model"], s, "--out", tmp_path / "OUT", *args)
    assert time.perf_counter() - t0 < 10
    error_lines(rc, err, 1, [str(s), "--mpp"], ["enlarged", "magnification"])


# ---------------------------------------------------------------------------------- messages (issue 13.10)


@pytest.mark.parametrize("input_size", [-5, 0, "abc", 1.5], ids=["negative", "zero", "text", "fraction"])
def test_bad_input_size_metadata_names_the_model_file_and_the_key(world, tmp_path, capsys, input_size):
    model = dark_detector_model(tmp_path / "odd.safetensors", input_size=input_size)
    p = patch(tmp_path / "in", "p.png")
    rc, _, err = cli(capsys, model, p, "--out", tmp_path / "OUT")
    (line,) = error_lines(rc, err, 2, [str(model), "input_size"], ["--tile-size"])
    assert f"--tile-size {input_size}" not in line and not (tmp_path / "OUT").exists()
    rc, _, err = cli(capsys, model, p, "--out", tmp_path / "OUT", "--tile-size", "64")  # the documented override
    assert rc == 0, err


@pytest.mark.parametrize("mpp", ["fast", -1, 1000], ids=["text", "negative", "implausible"])
def test_bad_mpp_metadata_names_the_model_file_and_the_key(world, tmp_path, capsys, mpp):
    model = dark_detector_model(tmp_path / "odd.safetensors", mpp=mpp)
    p = patch(tmp_path / "in", "p.png")
    rc, _, err = cli(capsys, model, p, "--out", tmp_path / "OUT")
    error_lines(rc, err, 2, [str(model), "mpp"], ["--model-mpp"])
    assert cli(capsys, model, p, "--out", tmp_path / "OUT", "--model-mpp", "0.5")[0] == 0


def test_a_missing_input_is_one_line_and_the_others_go_on(world, tmp_path, capsys):
    inputs = tmp_path / "in"
    good = slide(inputs, "good.tif", world["image"])
    rc, _, err = cli(capsys, world["model"], tmp_path / "nothere.svs", good, "--out", tmp_path / "OUT")
    (line,) = error_lines(rc, err, 1, [f"{tmp_path / 'nothere.svs'}: not found;"])
    assert "FileNotFoundError" not in line
    assert (tmp_path / "OUT" / "good" / "summary.json").is_file()


# ------------------------------------------------------------------------ large plain images (issue 13.4)


def _mpp_tags() -> dict:
    return {"resolution": (1 / 0.5e-4, 1 / 0.5e-4), "resolutionunit": "CENTIMETER"}


def test_a_tiny_png_claiming_a_huge_image_is_reported_as_truncated(world, tmp_path, capsys):
    bomb = png_header(tmp_path / "in" / "bomb.png", 30000, 30000)  # about 60 bytes, no pixel data
    rc, _, err = cli(capsys, world["model"], bomb, "--out", tmp_path / "OUT", "--mpp", "0.5")
    error_lines(rc, err, 1, [str(bomb), "30000 x 30000"], ["truncated"])


def test_a_png_whose_pixel_data_ends_early_is_reported_as_truncated(world, tmp_path, capsys):
    full = tmp_path / "full.png"
    Image.fromarray(np.tile(world["image"], (3, 3, 1))).save(full)  # 600 x 480: a slide (--patch-max 300)
    cut = tmp_path / "in" / "cut.png"
    cut.parent.mkdir()
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    rc, _, err = cli(capsys, world["model"], cut, "--out", tmp_path / "OUT", "--mpp", "0.5", "--patch-max", "300")
    error_lines(rc, err, 1, [str(cut), "600 x 480"], ["truncated"])


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp"])
def test_a_large_image_that_must_be_decoded_whole_is_refused_above_the_limit(world, tmp_path, capsys, monkeypatch,
                                                                                fmt):
    path = tmp_path / "in" / f"big.{fmt}"
    path.parent.mkdir()
    Image.fromarray(world["image"]).save(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "20000")  # 200 x 160 = 32000 px is "huge" now
    rc, _, err = cli(capsys, world["model"], path, "--out", tmp_path / "OUT", "--mpp", "0.5", "--patch-max", "100")
    error_lines(rc, err, 1, [str(path), "200 x 160", "0.02 Mpx limit", MAX_PIXELS_ENV], ["tiled pyramidal tiff"])


def test_a_large_plain_tiff_is_read_strip_by_strip_with_the_same_result(world, tmp_path, capsys, monkeypatch):
    from ikdmil.slide.reader import TiffStripSlide, open_slide

    path = tmp_path / "in" / "stripped.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, world["image"], rowsperstrip=8, compression="zlib", **_mpp_tags())
    rc, _, err = cli(capsys, world["model"], path, "--out", tmp_path / "whole", "--patch-max", "100")
    assert rc == 0, err
    monkeypatch.setenv(MAX_PIXELS_ENV, "20000")
    with open_slide(path) as s:
        assert isinstance(s, TiffStripSlide) and s.mpp == pytest.approx((0.5, 0.5))
        assert (s.read_region((-5, 150), 0, (40, 20))[:10, 5:] == world["image"][150:160, :35]).all()
    rc, _, err = cli(capsys, world["model"], path, "--out", tmp_path / "strips", "--patch-max", "100")
    assert rc == 0, err
    for name in ("probability.tif", "mask.tif"):
        assert (tifffile.imread(tmp_path / "whole" / "stripped" / name, key=0)
                == tifffile.imread(tmp_path / "strips" / "stripped" / name, key=0)).all()
    summary = json.loads((tmp_path / "strips" / "stripped" / "summary.json").read_text())
    assert summary["reader"] == "image:tiff" and summary["tiles"] > 0


@pytest.mark.parametrize("kind", ["rgba", "gray16", "tiled"])
def test_strip_reading_converts_pixels_like_whole_decoding(tmp_path, monkeypatch, kind):
    from ikdmil.slide.reader import ImageSlide, TiffStripSlide, open_slide

    rng = np.random.default_rng(2)
    arr = {"rgba": rng.integers(0, 256, (50, 70, 4), dtype=np.uint8),
           "gray16": rng.integers(0, 65536, (50, 70), dtype=np.uint16),
           "tiled": rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)}[kind]
    path = tmp_path / f"{kind}.tif"
    kw = {"tile": (16, 16)} if kind == "tiled" else {"rowsperstrip": 7}
    tifffile.imwrite(path, arr, photometric="minisblack" if arr.ndim == 2 else "rgb", compression="zlib",
                     extrasamples=[2] if kind == "rgba" else None, **kw)
    whole = ImageSlide(path).read_region((0, 0), 0, (70, 50))
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    if kind != "tiled":  # (OpenSlide itself opens a tiled TIFF)
        with open_slide(path) as s:
            assert isinstance(s, TiffStripSlide)
    with TiffStripSlide(path) as s:
        assert (s.read_region((0, 0), 0, (70, 50)) == whole).all()
        assert (s.read_region((33, 21), 0, (20, 9)) == whole[21:30, 33:53]).all()


@pytest.mark.parametrize("case", ["truncated", "one-strip"])
def test_a_large_tiff_that_cannot_be_read_in_pieces_is_one_line(world, tmp_path, capsys, monkeypatch, case):
    path = tmp_path / "in" / f"{case}.tif"
    path.parent.mkdir()
    if case == "truncated":
        tifffile.imwrite(path, world["image"], rowsperstrip=8, compression="zlib", **_mpp_tags())
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
        names, hint = [str(path)], "truncated"
    else:
        tifffile.imwrite(path, world["image"], rowsperstrip=160, **_mpp_tags())
        names, hint = [str(path), MAX_PIXELS_ENV], "strips of 160 rows"
    monkeypatch.setenv(MAX_PIXELS_ENV, "20000")
    rc, _, err = cli(capsys, world["model"], path, "--out", tmp_path / "OUT", "--patch-max", "100")
    error_lines(rc, err, 1, names, [hint])


def test_the_overview_of_a_single_level_image_is_read_in_bounded_bands(tmp_path, monkeypatch):
    import ikdmil.slide.reader as reader

    yy, xx = np.mgrid[0:240, 0:320]  # 320 x 240, smooth like tissue (band edges lose a little filter support)
    arr = np.stack([xx * 0.7, yy, (xx + yy) * 0.4], -1).astype(np.uint8)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, arr, rowsperstrip=4, compression="zlib")
    whole = reader.read_overview(reader.ImageSlide(path), 8.0)
    reads = []
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    monkeypatch.setattr(reader, "OVERVIEW_READ_PIXELS", 320 * 40)
    with reader.TiffStripSlide(path) as s:
        real = s.read_region
        s.read_region = lambda loc, level, size: reads.append(size) or real(loc, level, size)
        banded = reader.read_overview(s, 8.0)
    assert banded.shape == whole.shape == (30, 40, 3)
    assert max(w * h for w, h in reads) <= 320 * 40 and len(reads) == 6
    assert np.abs(banded.astype(int) - whole).mean() < 1.0
