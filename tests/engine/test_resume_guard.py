"""--resume refuses options that define the run, names them, and accepts the ones that may change."""

import dataclasses

import pytest

from ikdmil.cli import main
from ikdmil.config import RESUME_MAY_CHANGE
from ikdmil.engine.pipeline import Pipeline
from ikdmil.errors import IkdmilError


def _finished_run(tiny_synth, tmp_path, tiny_config):
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=0, distill_epochs=0)
    Pipeline(cfg, progress=False).run()
    return cfg


@pytest.mark.parametrize("change, named", [
    ({"input_size": 48}, "--input-size 48"),
    ({"lr": 2e-3}, "--lr 0.002"),
    ({"kd_structure": "block"}, "--kd-structure 'block'"),
    ({"data": "OTHER"}, "DATA"),
])
def test_a_changed_run_defining_option_is_refused(tiny_synth, tmp_path, tiny_config, change, named):
    cfg = _finished_run(tiny_synth, tmp_path, tiny_config)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    if change.get("data") == "OTHER":
        change = {"data": str(tmp_path / "other")}
    with pytest.raises(IkdmilError) as err:
        Pipeline(dataclasses.replace(cfg, **change), resume=True, progress=False)
    msg = str(err.value)
    assert named.split()[0] in msg and "--resume" in msg and "\n" not in msg
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before  # nothing written


def test_options_that_may_change_are_accepted_and_listed_in_help(tiny_synth, tmp_path, tiny_config, capsys):
    cfg = _finished_run(tiny_synth, tmp_path, tiny_config)
    other = dataclasses.replace(cfg, workers=0, device="cpu", track_test=True, cache_dir=str(tmp_path / "cache2"))
    results = Pipeline(other, resume=True, progress=False).run()
    assert results["models"]["teacher"]["test"]["n"] > 0
    assert all(name in RESUME_MAY_CHANGE for name in ("teacher_epochs", "distill_epochs", "device", "workers"))
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--distill-epochs" in help_text and "may differ" in help_text
