"""The manifest's optional mpp column: written by preparers, read back, bad values refused."""

import pytest

from ikdmil.data.manifest import Sample, read_manifest, write_manifest
from ikdmil.errors import IkdmilError


def test_mpp_round_trips_and_stays_optional(tmp_path):
    samples = [Sample(tmp_path / "a.png", 1, None, "train", 0.62), Sample(tmp_path / "b.png", 0, None, "val")]
    back = read_manifest(write_manifest(samples, tmp_path / "manifest.csv"))
    assert [s.mpp for s in back] == [0.62, None]
    (tmp_path / "old.csv").write_text("image,label,split\na.png,1,train\n")  # a manifest without the column
    assert read_manifest(tmp_path / "old.csv")[0].mpp is None


@pytest.mark.parametrize("value", ["20x", "0", "-0.5"])
def test_bad_mpp_names_the_line_and_the_fix(tmp_path, value):
    (tmp_path / "m.csv").write_text(f"image,label,split,mpp\na.png,1,train,{value}\n")
    with pytest.raises(IkdmilError, match=r"m\.csv:2: mpp must be .*µm per pixel.*fix the mpp column"):
        read_manifest(tmp_path / "m.csv")
