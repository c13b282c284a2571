"""Command-line options derived from the settings dataclasses (`ikdmil.options`): every field is an
option, every bad value is a one-line error naming the option (exit 2, nothing created), --quiet and
-v work before and after the command, and logging reaches the terminal only through `main`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass

import pytest

from ikdmil.cli import build_parser, main
from ikdmil.config import DemoSettings, EvaluateSettings, RunConfig
from ikdmil.errors import IkdmilError
from ikdmil.inference import PredictSettings
from ikdmil.options import Parser, TerminalHandler, add_settings_options, given_values, settings_from_args
from ikdmil.prepare.regions import RegionsOptions
from ikdmil.slide.tissue import TissueParams
from ikdmil.typed_settings import option_flag


def subcommand_help(command: str, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


# ----------------------------------------------------------------- every field is an option
SETTINGS = [("train", RunConfig, ("data", "out")), ("run", RunConfig, ("data", "out")),
            ("distill", RunConfig, ("data", "out")), ("demo", RunConfig, ("data", "out", "cache_dir")),
            ("demo", DemoSettings, ()), ("evaluate", EvaluateSettings, ()), ("predict", PredictSettings, ("tissue",)),
            ("predict", TissueParams, ()), ("prepare", TissueParams, ()), ("prepare", RegionsOptions, ("tissue",))]


@pytest.mark.parametrize("command, cls, skip", SETTINGS, ids=[f"{c}-{k.__name__}" for c, k, _ in SETTINGS])
def test_every_settings_field_is_an_option(command, cls, skip, capsys):
    text = subcommand_help(command, capsys)
    prefix = "tissue-" if cls is TissueParams else ""
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            assert option_flag(cls, f.name, prefix) in text, f"{command}: no option for {cls.__name__}.{f.name}"


def test_a_new_field_becomes_an_option_with_its_comment_as_help():
    @dataclass
    class Settings:
        fusion_lr: float = 0.01  # learning rate of the fusion-weight fit
        track_test: bool = False
        kd_structure: str = "fusion"
        fusion_weights: list[float] | None = None

    parser = argparse.ArgumentParser()
    add_settings_options(parser, Settings)
    text = parser.format_help()
    assert "learning rate of the fusion-weight fit (default: 0.01)" in text and "--no-track-test" in text
    args = parser.parse_args(["--fusion-lr", "1e-3", "--track-test", "--fusion-weights", "0.2,0.3,0.5"])
    assert settings_from_args(Settings, args) == Settings(fusion_lr=1e-3, track_test=True,
                                                          fusion_weights=[0.2, 0.3, 0.5])
    strict = Parser(prog="p")
    add_settings_options(strict, Settings)
    with pytest.raises(IkdmilError, match="argument --fusion-weights: expected a number, got 'x'"):
        strict.parse_args(["--fusion-weights", "1,x"])
    assert settings_from_args(Settings, parser.parse_args([]), {"kd_structure": "side"}).kd_structure == "side"


def test_options_layer_over_config_values_and_nested_tissue():
    args = build_parser().parse_args(["predict", "m", "x", "--out", "o", "--tissue-mpp", "4", "--no-amp",
                                      "--colour", "#ff0000"])
    assert given_values(args, PredictSettings) == {"tissue": {"mpp": 4.0}, "amp": False, "colour": (255, 0, 0)}
    s = settings_from_args(PredictSettings, args, {"sigma": 1.0, "tissue": {"close_um": 3.0}})
    assert s.sigma == 1.0 and s.tissue == TissueParams(mpp=4.0, close_um=3.0) and s.amp is False


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["synth", "x"], False, 0), (["--quiet", "synth", "x"], True, 0), (["synth", "x", "--quiet"], True, 0),
    (["-v", "train", "d"], False, 1), (["train", "d", "-vv"], False, 2),
])
def test_quiet_and_verbose_before_or_after_the_command(argv, quiet, verbose):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


# ----------------------------------------------------------------- bad option values
BAD_OPTIONS = [
    # (command line before the bad option, option, value, words in the message)
    ("train", "--weight-decay", "-1", "at least 0"),
    ("train", "--eval-sigma", "inf", "finite"),
    ("train", "--eval-sigma", "-1", "at least 0"),
    ("train", "--wce-scale", "nan", "finite"),
    ("train", "--lr", "fast", "expected a number"),
    ("train", "--lr", "0", "positive"),
    ("train", "--teacher-epochs", "1.5", "whole number"),
    ("train", "--threshold", "1", "(0, 1)"),
    ("train", "--input-size", "8", "at least 32"),
    ("train", "--device", "gpu", "one of auto, cpu, cuda"),
    ("train", "--batch-size", "9" * 5000, "whole number"),
    ("train", "--lr", "1" + "0" * 400, "finite"),
    ("run", "--swap-every", "0", "at least 1"),
    ("distill", "--batch-size", "0", "at least 1"),
    ("demo", "--lr", "-1", "positive"),
    ("demo", "--overlays", "-2", "at least 0"),
    ("evaluate", "--input-size", "-3", "at least 32"),
    ("evaluate", "--eval-sigma", "-1", "at least 0"),
    ("evaluate", "--threshold", "5", "(0, 1)"),
    ("evaluate", "--overlays", "many", "whole number"),
    ("predict", "--mpp", "40", "magnification"),
    ("predict", "--mpp", "0", "(0, 20]"),
    ("predict", "--sigma", "nan", "finite"),
    ("predict", "--overlap", "-1", "at least 0"),
    ("predict", "--threshold", "5", "(0, 1)"),
    ("predict", "--colour", "300,0,0", "R,G,B"),
    ("predict", "--tissue-mpp", "0", "positive"),
    ("predict", "--device", "tpu", "cuda:N"),
    ("prepare", "--val-fraction", "1.5", "[0, 1)"),
    ("prepare", "--neg-ratio", "inf", "finite"),
    ("prepare", "--tissue-close-um", "-5", "at least 0"),
    ("synth", "--n", "many", "whole number"),
]
PREFIX = {"train": ["train", "DATA"], "run": ["run", "DATA"], "distill": ["distill", "DATA", "--teacher", "T"],
          "demo": ["demo"], "evaluate": ["evaluate", "MODEL", "DATA"], "predict": ["predict", "MODEL", "INPUT"],
          "prepare": ["prepare", "glas", "SRC"], "synth": ["synth"]}


@pytest.mark.parametrize("command, option, value, words", BAD_OPTIONS,
                         ids=[f"{c}{o}={v[:12]}" for c, o, v, _ in BAD_OPTIONS])
def test_bad_option_value_is_one_line_naming_the_option(command, option, value, words, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("DATA", str(tmp_path / "data")) for a in PREFIX[command]]
    argv += [str(out)] if command in ("prepare", "synth") else ["--out", str(out)]
    capsys.readouterr()
    assert main([*argv, option, value]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ikdmil: error: argument " + option + ":"), lines
    assert words in lines[0], lines[0]
    assert option == "--lr" or "--lr" not in lines[0], lines[0]  # --wce-scale nan once blamed --lr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "demo", "synth"])
@pytest.mark.parametrize("where", ["is-a-file", "below-a-file"])
def test_output_folder_that_cannot_be_a_folder(command, where, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    out = blocker if where == "is-a-file" else blocker / "sub" / "out"
    argv = {"train": ["train", str(tmp_path / "data"), "--pretrained", "none"],
            "evaluate": ["evaluate", str(tmp_path / "m.safetensors"), str(tmp_path)],
            "predict": ["predict", str(tmp_path / "m.safetensors"), str(tmp_path)],
            "demo": ["demo"], "synth": ["synth", str(out)]}[command]
    argv += [] if command == "synth" else ["--out", str(out)]
    capsys.readouterr()
    assert main([*argv, "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "file" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and blocker.read_text() == "a file"


# ----------------------------------------------------------------- logging and interrupts
def test_library_messages_reach_the_terminal_only_through_main(tmp_path, capsys, monkeypatch):
    from ikdmil.prepare import synth

    log = logging.getLogger("ikdmil.prepare.synth")
    real = synth.make_synthetic_dataset

    def noisy(*a, **k):
        log.info("an info line")
        log.warning("a warning line")
        log.debug("a debug line")
        return real(*a, **k)

    monkeypatch.setattr(synth, "make_synthetic_dataset", noisy)
    assert main(["synth", str(tmp_path / "a"), "--n", "12", "--size", "32"]) == 0
    cap = capsys.readouterr()
    assert "an info line" in cap.out and "a debug line" not in cap.out + cap.err
    assert "ikdmil: warning: a warning line" in cap.err
    assert main(["synth", str(tmp_path / "b"), "--n", "12", "--size", "32", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "an info line" not in cap.out and "a warning line" in cap.err and "wrote" in cap.out
    assert main(["-v", "synth", str(tmp_path / "c"), "--n", "12", "--size", "32", "--quiet"]) == 0
    assert "a debug line" not in capsys.readouterr().out  # --quiet wins over -v
    assert main(["-v", "synth", str(tmp_path / "d"), "--n", "12", "--size", "32"]) == 0
    assert "[ikdmil.prepare.synth] a debug line" in capsys.readouterr().out
    assert not [h for h in logging.getLogger("ikdmil").handlers if isinstance(h, TerminalHandler)]
    assert not [h for h in logging.getLogger().handlers if isinstance(h, TerminalHandler)]


def test_interrupted_predict_does_not_advise_resume(tmp_path, capsys, monkeypatch):
    import ikdmil.inference

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ikdmil.inference, "predict", interrupted)
    assert main(["predict", "m.safetensors", "x.svs", "--out", str(tmp_path / "o"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err and "run the same command again" in err
