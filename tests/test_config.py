"""The one typed YAML loader (`ikdmil.config`): what it accepts and coerces, and every kind of bad
config file through the real command line (train --config, predict --config): exit status 2, one
line naming the file (and the key), nothing created."""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from ikdmil.cli import main
from ikdmil.config import EvaluateSettings, RunConfig
from ikdmil.errors import IkdmilError
from ikdmil.inference import PredictSettings
from ikdmil.slide.tissue import TissueParams
from ikdmil.typed_settings import check_settings, coerce, load_settings, read_yaml, settings_from_mapping

# the classic "billion laughs": 291 bytes that expand to 9**7 strings when aliases are followed
ALIAS_BOMB = ('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
              'b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n'
              'd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n'
              'f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n')


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def one_line_error(rc: int, err: str, *names: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ikdmil: error: "), err
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    return lines[0]


# ----------------------------------------------------------------- what is accepted
def test_obvious_coercions_only():
    assert coerce("1e-4", float) == 1e-4 and isinstance(coerce(3, float), float)
    assert coerce("12", int) == 12 and coerce(None, int | None) is None
    assert coerce([1, 2, 3], tuple[int, int, int]) == (1, 2, 3)
    assert coerce("0.2, 0.3,0.5", list[float]) == [0.2, 0.3, 0.5] and coerce([1, "2"], tuple[int, ...]) == (1, 2)
    assert coerce("side", typing.Literal["fusion", "side"]) == "side"
    for value, tp in [(1.5, int), (2.0, int), ("1.5", int), (True, int), ("no", bool), ("false", bool), (0, bool),
                      ("fast", float), (True, float), (3, str), (None, float), ([1, 2], tuple[int, int, int]),
                      ("1,x", list[float]), (5, list[int]), ("both", typing.Literal["fusion", "side"])]:
        with pytest.raises(ValueError, match="expected"):
            coerce(value, tp)


def test_a_run_config_round_trips_and_yaml_1_1_floats_are_read(tmp_path):
    cfg = RunConfig(lr=1e-4, augment=False, teacher_epochs=3)
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == cfg
    loaded = RunConfig.load(write(tmp_path / "c.yaml", "lr: 1e-4\nweight_decay: 5e-4\nteacher_epochs: '3'\n"))
    assert loaded.lr == 1e-4 and isinstance(loaded.lr, float) and loaded.teacher_epochs == 3


def test_predict_settings_round_trip_with_nested_tissue_and_a_colour_string(tmp_path):
    s = PredictSettings(tissue=TissueParams(mpp=4.0), colour=(1, 2, 3), mpp=0.25)
    import yaml

    write(tmp_path / "p.yaml", yaml.safe_dump({"command": "predict", "settings": s.to_dict()}))
    assert load_settings(PredictSettings, tmp_path / "p.yaml", section="settings") == s
    t = settings_from_mapping(PredictSettings, {"colour": "#0a0b0c", "tissue": {"close_um": 5}})
    assert t.colour == (10, 11, 12) and t.tissue == TissueParams(close_um=5.0)
    assert read_yaml(write(tmp_path / "empty.yaml", "")) == {}


def test_validate_checks_types_and_bounds_of_every_field_and_names_the_option():
    with pytest.raises(IkdmilError, match="--wce-scale must be a finite number"):
        RunConfig(wce_scale=float("nan")).validate()
    with pytest.raises(IkdmilError, match="--weight-decay must be at least 0"):
        RunConfig(weight_decay=-1).validate()
    with pytest.raises(IkdmilError, match="--augment: expected true or false, got 'no'"):
        RunConfig(augment="no").validate()
    with pytest.raises(IkdmilError, match="--tissue-mpp must be positive"):
        PredictSettings(tissue=TissueParams(mpp=0)).validate()
    with pytest.raises(IkdmilError, match="--threshold must be in \\(0, 1\\) \\(got 5\\)"):
        EvaluateSettings(threshold=5).validate()


def test_a_field_without_metadata_is_checked_by_its_type():
    @dataclass
    class Extra:
        fusion_lr: float = 0.01  # learning rate of the fusion fit
        side_taps: int = 3

    assert check_settings(Extra(fusion_lr="1e-3")).fusion_lr == 1e-3
    with pytest.raises(IkdmilError, match="--fusion-lr must be a finite number"):
        check_settings(Extra(fusion_lr=float("inf")))
    with pytest.raises(IkdmilError, match="--side-taps: expected a whole number"):
        check_settings(Extra(side_taps=1.5))


# ----------------------------------------------------------------- bad config files through the CLI
BAD_CONFIGS = {
    # name: (content, words the one-line message must contain besides the file name)
    "alias-bomb": (ALIAS_BOMB, ["alias"]),
    "merge-key-alias": ("base: &b {lr: 1.0e-3}\nother:\n  <<: *b\n", ["alias"]),
    "augment-no": ('augment: "no"\n', ["augment", "expected true or false, got 'no'"]),
    "compile-yes-string": ("compile: 'yes'\n", ["compile", "true or false"]),
    "teacher-epochs-1.5": ("teacher_epochs: 1.5\n", ["teacher_epochs", "expected a whole number, got 1.5"]),
    "lr-word": ("lr: fast\n", ["lr", "expected a number, got 'fast'"]),
    "lr-negative": ("lr: -1.0e-3\n", ["lr", "positive"]),
    "wce-scale-nan": ("wce_scale: .nan\n", ["wce_scale", "finite"]),
    "backbone-number": ("backbone: 16\n", ["backbone", "expected text"]),
    "yaml-list": ("- lr: 1.0e-3\n- augment: true\n", ["a list"]),
    "yaml-scalar": ("just some text\n", ["single text value"]),
    "yaml-number": ("42\n", ["single int"]),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), ["binary"]),
    "not-utf8": ("lr: 1.0e-3\nbackbone: vgg16\xe9\n".encode("latin-1"), ["UTF-8"]),
    "unknown-key": ("lr: 1.0e-3\nlearning_rate: 1.0e-3\n", ["unknown", "learning_rate"]),
    "syntax-error": ("lr: [1.0e-3\n", ["cannot read config"]),
    "deep-nesting": ("[" * 20000 + "\n", ["nested too deeply"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_training_config_is_one_line_and_creates_nothing(case, tmp_path, capsys):
    content, words = BAD_CONFIGS[case]
    config = write(tmp_path / f"{case}.yaml", content)
    capsys.readouterr()
    start = time.perf_counter()
    rc = main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--config", str(config), "--quiet"])
    assert time.perf_counter() - start < 5, "a bad config must fail fast"
    one_line_error(rc, capsys.readouterr().err, str(config), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == [config.name]


BAD_PREDICT_CONFIGS = {
    "alias-bomb": (ALIAS_BOMB, ["alias"]),
    "overwrite-false-string": ('settings:\n  overwrite: "false"\n', ["overwrite", "true or false"]),
    "tissue-type": ("settings:\n  tissue:\n    mpp: fast\n", ["tissue.mpp", "expected a number"]),
    "tissue-unknown": ("tissue:\n  radius: 3\n", ["unknown", "tissue.radius"]),
    "colour": ("colour: [300, 0, 0]\n", ["colour", "0-255"]),
    "mpp-magnification": ("mpp: 40\n", ["mpp", "magnification"]),
    "settings-list": ("settings: [1, 2]\n", ["a list"]),
    "binary": (bytes(range(256)) * 4, ["binary"]),
}


@pytest.mark.parametrize("case", sorted(BAD_PREDICT_CONFIGS))
def test_bad_predict_config_is_one_line_and_creates_nothing(case, tmp_path, capsys):
    content, words = BAD_PREDICT_CONFIGS[case]
    config = write(tmp_path / f"{case}.yaml", content)
    capsys.readouterr()
    rc = main(["predict", str(tmp_path / "model.safetensors"), str(tmp_path), "--out", str(tmp_path / "out"),
               "--config", str(config), "--quiet"])
    one_line_error(rc, capsys.readouterr().err, str(config), *words)
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_named(tmp_path, capsys):
    rc = main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(tmp_path / "nope.yaml")])
    one_line_error(rc, capsys.readouterr().err, "nope.yaml", "not found")
    assert not (tmp_path / "run").exists()
