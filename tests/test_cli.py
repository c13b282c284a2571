"""The command line end to end on tiny synthetic data, and every command's --help."""

import json

import pytest

from ikdmil.cli import build_parser, main

COMMANDS = ["demo", "synth", "prepare", "train", "run", "distill", "evaluate", "predict"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: ikdmil " + command in capsys.readouterr().out


def test_parser_lists_all_commands():
    text = build_parser().format_help()
    for c in COMMANDS:
        assert c in text


def test_cli_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", str(data), "--n", "12", "--size", "32", "--seed", "1", "--quiet"]) == 0
    common = ["--input-size", "32", "--batch-size", "4", "--pretrained", "none", "--eval-sigma", "0",
              "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["train", str(data), "--out", str(tmp_path / "t"), "--teacher-epochs", "1",
                 "--fusion-epochs", "1", *common]) == 0
    assert (tmp_path / "t" / "teacher.safetensors").is_file()
    assert main(["distill", str(data), "--teacher", str(tmp_path / "t" / "teacher.safetensors"),
                 "--distill-epochs", "2", "--swap-every", "1", *common]) == 0
    d = tmp_path / "t" / "distill"
    results = json.loads((d / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "student"}
    assert "distill_epochs: 2" in (d / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(d / "model.safetensors"), str(data), "--split", "test", "--eval-sigma", "0",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "F1" in out and "IoU" in out
    ev = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert ev["summary"]["n"] == len(ev["patches"]) > 0
    assert len(list((tmp_path / "ev" / "overlays").glob("*.png"))) == ev["summary"]["n"]


def test_run_resume_from_the_command_line(tmp_path):
    data = tmp_path / "data"
    main(["synth", str(data), "--n", "12", "--size", "32", "--quiet"])
    args = ["run", str(data), "--out", str(tmp_path / "r"), "--input-size", "32", "--batch-size", "6",
            "--pretrained", "none", "--teacher-epochs", "1", "--fusion-epochs", "0", "--distill-epochs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 0
    assert main(args) == 2  # a second start without --resume refuses to overwrite the run
    # --resume of a finished run re-evaluates and exits cleanly, with the saved config
    assert main(["run", "--out", str(tmp_path / "r"), "--resume", "--quiet"]) == 0


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "12", "--image-size", "32", "--input-size", "32",
                 "--teacher-epochs", "1",
                 "--fusion-epochs", "1", "--distill-epochs", "2", "--swap-every", "1", "--pretrained", "none",
                 "--overlays", "2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "teacher" in text and "student" in text and "HD" in text
    assert len(list((out / "overlays" / "student").glob("*.png"))) == 2
