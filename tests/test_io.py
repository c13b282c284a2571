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
