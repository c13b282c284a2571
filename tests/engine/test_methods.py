"""The method registry: names, errors, and every registered method's outputs (registry-parametrised)."""

import pytest

from ikdmil.errors import IkdmilError
from ikdmil.methods import available_methods, get_method, register_method
from ikdmil.models.checkpoint import load_model


def test_ikd_is_registered_and_unknown_names_fail_in_one_line():
    assert "ikd" in available_methods()
    with pytest.raises(IkdmilError, match="unknown method 'nope'.*ikd"):
        get_method("nope")


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register_method("ikd")(lambda cfg, **kw: {})


@pytest.mark.parametrize("name", available_methods())
def test_every_method_writes_model_files_that_load(name, tiny_synth, tmp_path, tiny_config):
    cfg = tiny_config(tiny_synth, tmp_path / "run", teacher_epochs=1, fusion_epochs=1, distill_epochs=1)
    results = get_method(name).train(cfg, progress=False)
    assert results["selected"] in results["models"]
    for entry in results["models"].values():
        model, meta = load_model(tmp_path / "run" / entry["file"])
        assert meta["backbone"] == cfg.backbone and entry["test"]["n"] > 0
    load_model(tmp_path / "run" / "model.safetensors")
