"""Image reading guards: decompression bombs and truncated files give one-line errors naming the file."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ikdmil.errors import IkdmilError
from ikdmil.io import MAX_PIXELS_ENV, read_mask, read_rgb


def _png_header_only(path, width, height):
    """A valid PNG signature + IHDR claiming width x height, and no pixel data (about 50 bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("reader", [read_rgb, read_mask])
def test_a_header_claiming_a_huge_image_is_refused_before_decoding(tmp_path, reader, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 120
    with pytest.raises(IkdmilError) as err:
        reader(bomb)
    msg = str(err.value)
    assert str(bomb) in msg and "30000 x 30000" in msg and MAX_PIXELS_ENV in msg and "\n" not in msg


def test_raising_the_limit_then_reports_the_missing_pixels_as_truncated(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, "1e9")
    bomb = _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(IkdmilError, match="truncated"):
        read_rgb(bomb)


def test_images_under_the_limit_read_normally(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, str(64 * 64))
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "ok.png")
    assert read_rgb(tmp_path / "ok.png").shape == (64, 64, 3)
    Image.fromarray(np.full((65, 64, 3), 200, np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(IkdmilError, match="limit"):
        read_rgb(tmp_path / "big.png")


def test_a_bad_limit_value_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")
    with pytest.raises(IkdmilError, match=MAX_PIXELS_ENV):
        read_rgb(tmp_path / "ok.png")


def test_manifest_paths_outside_the_dataset_are_read_and_said_once(tmp_path, caplog):
    from ikdmil.data.manifest import read_manifest

    store = tmp_path / "store"
    store.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(store / name)
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.csv").write_text(f"image,label,mask,split\n../store/a.png,0,,train\n{store / 'b.png'},0,,val\n")
    with caplog.at_level("WARNING", logger="ikdmil"):
        samples = read_manifest(data / "manifest.csv")
    assert [s.image.resolve() for s in samples] == [store / "a.png", store / "b.png"]
    notes = [r for r in caplog.records if "outside the manifest's folder" in r.getMessage()]
    assert len(notes) == 1 and "2 of 2" in notes[0].getMessage()


def test_temporaries_of_a_killed_run_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from ikdmil.io import atomic_path, make_temp_dir, remove_stale_temps, temp_prefix

    # a process killed mid-write (os._exit skips every cleanup) leaves its temporaries behind
    code = ("import os, sys; from pathlib import Path; from ikdmil.io import atomic_path, make_temp_dir\n"
            "d = make_temp_dir(Path(sys.argv[1]) / 'cache-entry'); (d / 'images.npy').write_bytes(b'x' * 1000)\n"
            "with atomic_path(Path(sys.argv[1]) / 'checkpoint.pt') as t:\n    t.write_bytes(b'half'); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(".tmp-" in name for name in left)
    # ours (a live process) and another host's (a shared disk) are not touched
    mine = make_temp_dir(tmp_path / "running")
    with atomic_path(tmp_path / "done.txt") as t:
        t.write_text("ok")
    foreign = tmp_path / ".x.tmp-otherhost-1-abc"
    foreign.write_text("theirs")
    (tmp_path / "keep.txt").write_text("user file")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, foreign.name, "done.txt", "keep.txt"])
    assert mine.name.startswith(temp_prefix(tmp_path / "running"))


def test_the_cache_clears_what_a_killed_build_left(tmp_path, tiny_synth):
    from ikdmil.data.dataset import build_cache
    from ikdmil.data.manifest import load_samples

    cache = tmp_path / "cache"
    cache.mkdir()
    from ikdmil.io import owner_tag

    host = owner_tag().rsplit("-", 1)[0]
    stale = cache / f".abc.tmp-{host}-999999999-zz"  # no such process
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"0" * 4096)
    samples = [s for s in load_samples(tiny_synth) if s.split == "train"]
    build_cache(samples, 32, cache, False, "test")
    assert not stale.exists()
