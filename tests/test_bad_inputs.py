"""Bad input through the real command line: one-line error naming the file and the fix, exit 2,
nothing half-written; and the documented image conversions (grayscale, RGBA, 16-bit) giving the
right pixels and a working training run."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ikdmil.cli import main
from ikdmil.data.dataset import CACHE_FILES, build_cache
from ikdmil.data.manifest import Sample
from ikdmil.errors import IkdmilError
from ikdmil.io import read_mask, read_rgb

SIZE = 24


# ----------------------------------------------------------------- helpers
def _rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _mask() -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[6:18, 6:18] = 255
    return m


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_data(root: Path, n: int = 2) -> Path:
    """{train,val,test}/{pos,neg,masks}: n positives (with masks) and n negatives per split."""
    seed = 0
    for split in ("train", "val", "test"):
        for i in range(n):
            seed += 1
            _save(root / split / "pos" / f"{split}_p{i}.png", _rgb(seed))
            _save(root / split / "masks" / f"{split}_p{i}.png", _mask())
            seed += 1
            _save(root / split / "neg" / f"{split}_n{i}.png", _rgb(seed))
    return root


def png16(path: Path, arr: np.ndarray) -> Path:
    """Write a 16-bit grayscale (HxW) or RGB (HxWx3) PNG by hand (Pillow cannot write 16-bit RGB)."""
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def train(data, tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["train", str(data), "--out", str(tmp_path / "run"), "--input-size", "32", "--batch-size", "4",
               "--teacher-epochs", "1", "--fusion-epochs", "0", "--pretrained", "none", "--eval-sigma", "0",
               "--cache-dir", str(tmp_path / "cache"), "--quiet", *extra])
    return rc, capsys.readouterr().err


def cache_entries(cache: Path) -> list[dict]:
    """meta.json of every cache entry; asserts there is nothing partial or temporary in the folder."""
    if not cache.exists():
        return []
    metas = []
    for entry in cache.iterdir():
        assert not entry.name.startswith("."), f"temporary cache folder left behind: {entry}"
        assert all((entry / f).is_file() for f in CACHE_FILES), f"incomplete cache entry: {entry}"
        metas.append(json.loads((entry / "meta.json").read_text()))
    return metas


def assert_clean_failure(rc: int, err: str, names: list[str], hints: list[str], tmp_path: Path,
                         bad_file: Path | None = None) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    line = lines[0]
    assert line.startswith("ikdmil: error: "), line
    for name in names:
        assert name in line, f"{name!r} not named in: {line}"
    assert any(h in line.lower() for h in hints), f"no hint among {hints} in: {line}"
    run = tmp_path / "run"
    if run.exists():
        written = [p for p in run.rglob("*") if p.is_file()]
        assert not [p for p in written if p.suffix in (".safetensors", ".pt", ".json", ".tmp") or ".tmp" in p.name], \
            written
    metas = cache_entries(tmp_path / "cache")
    if bad_file is not None:
        for meta in metas:
            assert str(bad_file) not in meta["images"], "a cache entry holds the bad file"
    return line


# ----------------------------------------------------------------- dataset layout and manifest
def test_missing_data_folder(tmp_path, capsys):
    rc, err = train(tmp_path / "no_such_data", tmp_path, capsys)
    assert_clean_failure(rc, err, ["no_such_data"], ["not found", "create"], tmp_path)


def test_folder_without_images(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "train" / "pos").mkdir(parents=True)
    (data / "train" / "pos" / "notes.txt").write_text("not an image")
    rc, err = train(data, tmp_path, capsys)
    line = assert_clean_failure(rc, err, [str(data)], ["no images"], tmp_path)
    assert "train/pos" in line


def test_train_split_without_negatives(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    for p in (data / "train" / "neg").iterdir():
        p.unlink()
    rc, err = train(data, tmp_path, capsys)
    line = assert_clean_failure(rc, err, [str(data)], ["add images"], tmp_path)
    assert "negative" in line and str(data / "train" / "neg") in line


def test_val_split_missing(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    for p in sorted((data / "val").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (data / "val").rmdir()
    rc, err = train(data, tmp_path, capsys)
    line = assert_clean_failure(rc, err, [str(data)], ["add images"], tmp_path)
    assert "'val'" in line


def _manifest(data: Path, rows: list[str], header: str = "image,label,mask,split") -> Path:
    path = data / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


GOOD_ROWS = ["train/pos/train_p0.png,1,train/masks/train_p0.png,train", "train/neg/train_n0.png,0,,train",
             "val/pos/val_p0.png,1,val/masks/val_p0.png,val", "val/neg/val_n0.png,0,,val"]


@pytest.mark.parametrize("rows, header, hint, where", [
    (GOOD_ROWS[:1] + ["train/neg/train_n0.png,2,,train"] + GOOD_ROWS[2:], None, "label", ":3:"),
    (GOOD_ROWS[:1] + ["train/neg/train_n0.png,neg,,train"] + GOOD_ROWS[2:], None, "label", ":3:"),
    (GOOD_ROWS[:3] + ["val/neg/val_n0.png,0,,validation"], None, "split", ":5:"),
    ([r.rsplit(",", 1)[0] for r in GOOD_ROWS], "image,label,mask", "header", "split"),
    ([",1,,train"] + GOOD_ROWS[1:], None, "image", ":2:"),
], ids=["label-2", "label-word", "split", "missing-column", "empty-image"])
def test_bad_manifest(tmp_path, capsys, rows, header, hint, where):
    data = make_data(tmp_path / "data", n=1)
    manifest = _manifest(data, rows, header or "image,label,mask,split")
    rc, err = train(manifest, tmp_path, capsys)
    line = assert_clean_failure(rc, err, [str(manifest), where], ["fix", "must be", "header"], tmp_path)
    assert hint in line


def test_manifest_with_bom_and_good_rows_is_accepted(tmp_path, capsys):
    """A spreadsheet's UTF-8 byte-order mark and spaces in the header do not break the manifest."""
    data = make_data(tmp_path / "data", n=1)
    manifest = data / "manifest.csv"
    manifest.write_text("\ufeffimage, label ,mask,split\n" + "\n".join(GOOD_ROWS) + "\n", encoding="utf-8")
    from ikdmil.data.manifest import read_manifest

    assert [s.label for s in read_manifest(manifest)] == [1, 0, 1, 0]


def test_binary_file_as_manifest(tmp_path, capsys):
    make_data(tmp_path / "data", n=1)
    bogus = tmp_path / "data.csv"
    bogus.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    rc, err = train(bogus, tmp_path, capsys)
    assert_clean_failure(rc, err, [str(bogus)], ["manifest csv"], tmp_path)


def test_manifest_pointing_to_missing_image(tmp_path, capsys):
    data = make_data(tmp_path / "data", n=1)
    manifest = _manifest(data, ["train/pos/gone.png,1,,train"] + GOOD_ROWS[1:])
    rc, err = train(manifest, tmp_path, capsys)
    assert_clean_failure(rc, err, ["gone.png"], ["not found", "check the path"], tmp_path,
                         bad_file=data / "train" / "pos" / "gone.png")


# ----------------------------------------------------------------- unreadable images and bad masks
def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("split", ["train", "val"])
def test_truncated_png(tmp_path, capsys, split):
    data = make_data(tmp_path / "data")
    bad = data / split / "pos" / f"{split}_p1.png"
    _truncate(bad)
    rc, err = train(data, tmp_path, capsys)
    assert_clean_failure(rc, err, [str(bad)], ["re-export", "remove"], tmp_path, bad_file=bad)
    if split == "val":  # the train entry was built before val failed: it is complete, and val has none
        assert len(cache_entries(tmp_path / "cache")) == 1


def test_non_image_with_png_suffix(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    bad = data / "train" / "neg" / "train_n0.png"
    bad.write_text("this is not a PNG, just text with a .png name\n")
    rc, err = train(data, tmp_path, capsys)
    assert_clean_failure(rc, err, [str(bad)], ["not an image", "remove"], tmp_path, bad_file=bad)


# Bad masks are planted in the validation split: training masks are never read by the weakly supervised
# methods (IKD included; see ikdmil.engine.run), only by supervised-unet (tests/methods/test_training.py).
def test_mask_size_mismatch(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    bad = _save(data / "val" / "masks" / "val_p0.png", np.zeros((SIZE - 4, SIZE), np.uint8))
    rc, err = train(data, tmp_path, capsys)
    line = assert_clean_failure(rc, err, [str(bad)], ["pair each image"], tmp_path,
                                bad_file=data / "val" / "pos" / "val_p0.png")
    assert f"{SIZE}x{SIZE - 4}" in line and f"{SIZE}x{SIZE}" in line


def test_mask_with_three_values(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    m = _mask()
    m[0:3, :] = 128
    bad = _save(data / "val" / "masks" / "val_p0.png", m)
    rc, err = train(data, tmp_path, capsys)
    line = assert_clean_failure(rc, err, [str(bad)], ["binarise"], tmp_path,
                                bad_file=data / "val" / "pos" / "val_p0.png")
    assert "0, 128, 255" in line


def test_colour_mask(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    m = np.zeros((SIZE, SIZE, 3), np.uint8)
    m[6:18, 6:18] = (255, 0, 0)
    bad = _save(data / "val" / "masks" / "val_p1.png", m)
    rc, err = train(data, tmp_path, capsys)
    assert_clean_failure(rc, err, [str(bad)], ["single-channel"], tmp_path,
                         bad_file=data / "val" / "pos" / "val_p1.png")


def test_bad_image_in_test_split_leaves_no_run(tmp_path, capsys):
    """The test split is checked before training starts: no checkpoint or model for a run that cannot finish."""
    data = make_data(tmp_path / "data")
    bad = data / "test" / "neg" / "test_n0.png"
    _truncate(bad)
    rc, err = train(data, tmp_path, capsys)
    assert_clean_failure(rc, err, [str(bad)], ["re-export", "remove"], tmp_path, bad_file=bad)


def test_build_cache_failure_leaves_nothing_and_stale_partial_entry_is_replaced(tmp_path):
    data = make_data(tmp_path / "data", n=1)
    good = [Sample(data / "train" / "pos" / "train_p0.png", 1, data / "train" / "masks" / "train_p0.png", "train"),
            Sample(data / "train" / "neg" / "train_n0.png", 0, None, "train")]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    cache = tmp_path / "cache"
    with pytest.raises(IkdmilError, match="bad.png"):
        build_cache(good + [Sample(bad, 0, None, "train")], 32, cache, progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []  # now refused at its header, before any write
    arrays = build_cache(good, 32, cache, progress=False)
    (entry,) = cache.iterdir()
    assert arrays.images.shape == (2, 32, 32, 3) and arrays.has_mask.tolist() == [True, True]
    # an incomplete entry (e.g. from an older version killed mid-build) is rebuilt, not trusted
    expect = np.array(arrays.images)
    del arrays
    (entry / "meta.json").unlink()
    (entry / "images.npy").unlink()
    (entry / "images.npy").write_bytes(b"half")
    again = build_cache(good, 32, cache, progress=False)
    np.testing.assert_array_equal(again.images, expect)
    assert cache_entries(cache) and len(list(cache.iterdir())) == 1


def test_interrupted_cache_build_leaves_nothing(tmp_path, monkeypatch):
    import ikdmil.data.dataset as dataset

    data = make_data(tmp_path / "data", n=2)
    samples = [Sample(p, 1, None, "train") for p in sorted((data / "train" / "pos").iterdir())]
    real = dataset.load_sample

    def flaky(sample, size):
        if sample is samples[-1]:
            raise KeyboardInterrupt
        return real(sample, size)

    monkeypatch.setattr(dataset, "load_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_cache(samples, 32, tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


# ----------------------------------------------------------------- model files
def _model_file(path: Path, tensors: dict | None = None, meta: dict | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    from ikdmil.models.checkpoint import FORMAT

    tensors = tensors if tensors is not None else {"features.0.weight": torch.zeros(4, 3, 3, 3)}
    metadata = None if meta is None else {"ikdmil": json.dumps({"format": FORMAT, "backbone": "vgg16",
                                                                "input_size": 32, **meta})}
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def vgg_state():
    from ikdmil.models import create_model

    model, _ = create_model("vgg16", pretrained="none")
    return model


def _evaluate(model: Path, data: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["evaluate", str(model), str(data), "--out", str(tmp_path / "ev"), "--input-size", "32",
               "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    return rc, capsys.readouterr().err


def _bad_models(tmp_path: Path, vgg) -> dict[str, tuple[Path, list[str]]]:
    import torch

    from ikdmil.models.checkpoint import save_model

    folder = tmp_path / "models"
    folder.mkdir()
    state = {k: v.detach().clone() for k, v in vgg.state_dict().items()}
    first = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    wrong_shape = dict(state)
    wrong_shape[first] = torch.zeros(state[first].shape[0] + 1, *state[first].shape[1:])
    renamed = {"backbone2." + k: v for k, v in state.items()}
    real = save_model(vgg, folder / "real.safetensors", input_size=32)
    truncated = folder / "truncated.safetensors"
    raw = real.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = folder / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a model at all" * 20)
    pt = folder / "model.pt"
    torch.save(state, pt)
    return {
        "wrong-shapes": (_model_file(folder / "other_shapes.safetensors", wrong_shape, {}), ["another model"]),
        "other-keys": (_model_file(folder / "other_keys.safetensors", renamed, {}), ["another model"]),
        "unknown-backbone": (_model_file(folder / "mystery.safetensors", state, {"backbone": "no_such_backbone"}),
                             ["does not have", "trained with"]),
        "other-format": (_model_file(folder / "v9.safetensors", state, {"format": "ikdmil-model-9"}),
                         ["version", "retrain"]),
        "no-metadata": (_model_file(folder / "plain.safetensors", state, None), ["written by ikdmil"]),
        "truncated": (truncated, ["written by ikdmil", "damaged", "retrain"]),
        "garbage": (garbage, ["written by ikdmil"]),
        "torch-pickle": (pt, ["written by ikdmil"]),
        "missing": (folder / "missing.safetensors", ["not found"]),
    }


def test_evaluate_rejects_bad_model_files(tmp_path, capsys, vgg_state):
    data = make_data(tmp_path / "data", n=1)
    for name, (model, hints) in _bad_models(tmp_path, vgg_state).items():
        rc, err = _evaluate(model, data, tmp_path, capsys)
        assert_clean_failure(rc, err, [str(model)], hints, tmp_path)
        assert not (tmp_path / "ev").exists(), name
    assert not (tmp_path / "cache").exists()  # the model is checked before any image is decoded


def test_distill_rejects_bad_teacher_file(tmp_path, capsys):
    data = make_data(tmp_path / "data", n=1)
    garbage = tmp_path / "teacher.safetensors"
    garbage.write_bytes(b"definitely not safetensors")
    capsys.readouterr()
    rc = main(["distill", str(data), "--teacher", str(garbage), "--out", str(tmp_path / "run"), "--input-size", "32",
               "--pretrained", "none", "--distill-epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert_clean_failure(rc, capsys.readouterr().err, [str(garbage)], ["written by ikdmil"], tmp_path)


def test_evaluate_bad_image_writes_no_results(tmp_path, capsys, vgg_state):
    from ikdmil.models.checkpoint import save_model

    data = make_data(tmp_path / "data", n=1)
    bad = data / "test" / "pos" / "test_p0.png"
    _truncate(bad)
    model = save_model(vgg_state, tmp_path / "model.safetensors", input_size=32)
    rc, err = _evaluate(model, data, tmp_path, capsys)
    assert_clean_failure(rc, err, [str(bad)], ["re-export", "remove"], tmp_path, bad_file=bad)
    assert not (tmp_path / "ev").exists()


# ----------------------------------------------------------------- documented conversions
def test_grayscale_is_replicated(tmp_path):
    g = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE).astype(np.uint8)
    path = _save(tmp_path / "gray.png", g)
    assert Image.open(path).mode == "L"
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (SIZE, SIZE, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], g)


def test_rgba_is_composited_over_white(tmp_path):
    a = np.zeros((SIZE, SIZE, 4), np.uint8)
    a[...] = (10, 20, 30, 255)  # opaque: unchanged
    a[0, 0] = (200, 0, 0, 0)  # fully transparent: white, whatever its colour
    a[0, 1] = (255, 0, 0, 128)  # half-transparent red over white
    path = _save(tmp_path / "rgba.png", a)
    assert Image.open(path).mode == "RGBA"
    rgb = read_rgb(path)
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[5, 5].tolist() == [10, 20, 30]
    r, g, b = rgb[0, 1].tolist()
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    # grayscale + alpha too
    la = Image.fromarray(np.stack([np.full((SIZE, SIZE), 40, np.uint8), np.full((SIZE, SIZE), 255, np.uint8)], -1))
    la.putpixel((0, 0), (40, 0))
    la.save(tmp_path / "la.png")
    rgb = read_rgb(tmp_path / "la.png")
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[1, 1].tolist() == [40, 40, 40]


def test_16bit_is_scaled_to_8bit(tmp_path):
    v = np.full((SIZE, SIZE), 32896, np.uint16)
    v[0, 0], v[0, 1], v[0, 2], v[0, 3] = 65535, 0, 257, 255
    path = tmp_path / "gray16.png"
    Image.fromarray(v).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = read_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (SIZE, SIZE, 3)
    assert rgb[0, 0].tolist() == [255] * 3 and rgb[0, 1].tolist() == [0] * 3
    assert rgb[0, 2].tolist() == [1] * 3 and rgb[0, 3].tolist() == [1] * 3  # the full 16-bit range, never stretched
    assert rgb[5, 5].tolist() == [128] * 3
    # a dark 16-bit image is not stretched per image: max 255 stays dark
    dark = np.full((SIZE, SIZE), 255, np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert read_rgb(tmp_path / "dark16.png").max() == 1
    # 16-bit RGB (written by hand): same values
    rgb16 = np.zeros((SIZE, SIZE, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32896, 0
    out = read_rgb(png16(tmp_path / "rgb16.png", rgb16))
    assert out.dtype == np.uint8 and out[3, 3].tolist() == [255, 128, 0]


def test_binary_masks_in_all_accepted_forms(tmp_path):
    m = _mask()
    expect = m > 0
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "m255.png", m)), expect)
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "m01.png", (m > 0).astype(np.uint8))), expect)
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "mrgb.png", np.stack([m] * 3, -1))), expect)
    rgba = np.dstack([m, m, m, np.full_like(m, 255)])
    np.testing.assert_array_equal(read_mask(_save(tmp_path / "mrgba.png", rgba)), expect)
    Image.fromarray(m > 0).save(tmp_path / "m1bit.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m1bit.png"), expect)
    with pytest.raises(IkdmilError, match="m255.png: mask is 24x24 px but its image is 32x24 px"):
        read_mask(tmp_path / "m255.png", expect_shape=(24, 32))


def test_training_on_converted_images_succeeds(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    g = _rgb(99)[..., 0]
    _save(data / "train" / "pos" / "train_p0.png", g)  # grayscale (its mask stays)
    rgba = np.dstack([_rgb(98), np.full((SIZE, SIZE), 255, np.uint8)])
    rgba[:4, :4, 3] = 0
    _save(data / "train" / "neg" / "train_n0.png", rgba)  # RGBA with a transparent corner
    v = (np.random.default_rng(97).integers(0, 65536, (SIZE, SIZE))).astype(np.uint16)
    Image.fromarray(v).save(data / "val" / "pos" / "val_p0.png")  # 16-bit grayscale
    png16(data / "test" / "neg" / "test_n0.png", np.random.default_rng(96).integers(0, 65536, (SIZE, SIZE, 3)))
    rc, err = train(data, tmp_path, capsys)
    assert rc == 0, err
    run = tmp_path / "run"
    assert (run / "teacher.safetensors").is_file() and (run / "model.safetensors").is_file()
    assert json.loads((run / "results.json").read_text())["models"]["teacher"]["test"]["n"] == 4
    metas = cache_entries(tmp_path / "cache")
    assert len(metas) == 3  # train, val, test
    train_entry = next(e for e in (tmp_path / "cache").iterdir()
                       if str(data / "train" / "neg" / "train_n0.png")
                       in json.loads((e / "meta.json").read_text())["images"])
    images = np.load(train_entry / "images.npy")
    names = json.loads((train_entry / "meta.json").read_text())["images"]
    i = names.index(str(data / "train" / "neg" / "train_n0.png"))
    assert images[i, 0, 0].tolist() == [255, 255, 255]  # transparent corner cached as white
    j = names.index(str(data / "train" / "pos" / "train_p0.png"))
    assert (images[j, ..., 0] == images[j, ..., 1]).all() and (images[j, ..., 1] == images[j, ..., 2]).all()


@pytest.mark.parametrize("input_size", ["abc", 1.5, -5])
def test_evaluate_rejects_model_metadata_with_a_bad_input_size(tmp_path, capsys, vgg_state, input_size):
    data = make_data(tmp_path / "data", n=1)
    state = {k: v.detach().clone() for k, v in vgg_state.state_dict().items()}
    model = _model_file(tmp_path / "odd.safetensors", state, {"input_size": input_size})
    capsys.readouterr()
    rc = main(["evaluate", str(model), str(data), "--out", str(tmp_path / "ev"), "--cache-dir",
               str(tmp_path / "cache"), "--quiet"])
    line = assert_clean_failure(rc, capsys.readouterr().err, [str(model), "input_size"], ["--input-size"], tmp_path)
    assert "--tile-size" not in line
    assert not (tmp_path / "ev").exists() and not (tmp_path / "cache").exists()


def test_evaluate_never_replaces_a_training_runs_results(tmp_path, capsys, vgg_state):
    from ikdmil.models.checkpoint import save_model

    data = make_data(tmp_path / "data", n=1)
    run = tmp_path / "somerun"
    run.mkdir()
    (run / "config.yaml").write_text("lr: 1.0e-3\n")
    (run / "results.json").write_text('{"models": {}}')
    model = save_model(vgg_state, run / "model.safetensors", input_size=32)
    capsys.readouterr()
    rc = main(["evaluate", str(model), str(data), "--out", str(run), "--cache-dir", str(tmp_path / "cache"),
               "--quiet"])
    assert_clean_failure(rc, capsys.readouterr().err, [str(run), "results.json"], ["choose another --out"], tmp_path)
    assert (run / "results.json").read_text() == '{"models": {}}'


# ----------------------------------------------------------------- file names and huge headers (issue 13)
def test_a_symlink_loop_in_the_dataset_is_one_line(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    loop = data / "train" / "pos" / "loop.png"
    loop.symlink_to(loop)
    rc, err = train(data, tmp_path, capsys)
    assert_clean_failure(rc, err, [str(loop)], ["symbolic link"], tmp_path)


def test_a_non_utf8_file_name_in_the_dataset_is_one_line(tmp_path, capsys):
    import os

    data = make_data(tmp_path / "data")
    bad = os.fsencode(data / "train" / "neg") + b"/caf\xe9.png"
    with open(bad, "wb") as fh:
        fh.write((data / "train" / "neg" / "train_n0.png").read_bytes())
    rc, err = train(data, tmp_path, capsys)
    assert_clean_failure(rc, err, ["caf\\xe9.png"], ["utf-8"], tmp_path)


def test_a_tiny_file_claiming_a_huge_image_is_refused_before_decoding(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    bomb = data / "train" / "pos" / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                     + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + struct.pack(">I", 0) + b"IEND"
                     + struct.pack(">I", zlib.crc32(b"IEND")))
    rc, err = train(data, tmp_path, capsys)
    line = assert_clean_failure(rc, err, [str(bomb), "30000 x 30000"], ["ikdmil_max_image_pixels"], tmp_path)
    assert "limit" in line
