"""--compile and --compile-mode: the mode chosen per device, the option on the command line, the mode
handed to torch.compile. A real compile takes ~40 s on the 2-core CPU, so torch.compile itself is
replaced by a recorder here; the compiled GPU path is measured by benchmarks/throughput.py --compile."""

import torch

from ikdmil.cli import build_parser, main
from ikdmil.config import COMPILE_MODES, RunConfig
from ikdmil.device import compile_mode_for
from ikdmil.engine import run as run_module
from ikdmil.engine.run import TrainingRun

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_captures_cuda_graphs_on_cuda_only_and_cpu_never_gets_a_cuda_graph_mode():
    assert compile_mode_for("auto", CUDA) == "reduce-overhead"
    assert compile_mode_for("auto", CPU) == "default"
    for mode in COMPILE_MODES[1:]:
        assert compile_mode_for(mode, CUDA) == mode
    assert compile_mode_for("reduce-overhead", CPU) == "default"
    assert compile_mode_for("max-autotune", CPU) == "max-autotune-no-cudagraphs"
    assert compile_mode_for("max-autotune-no-cudagraphs", CPU) == "max-autotune-no-cudagraphs"


def test_compile_mode_is_an_option_checked_before_anything_runs(tmp_path, capsys):
    args = build_parser().parse_args(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--compile",
                                      "--compile-mode", "max-autotune-no-cudagraphs"])
    assert args.compile is True and args.compile_mode == "max-autotune-no-cudagraphs"
    assert RunConfig().compile_mode == "auto"
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "r"), "--compile-mode", "fast"]) == 2
    err = capsys.readouterr().err
    assert "--compile-mode: must be one of auto, default, reduce-overhead" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_training_compiles_the_model_with_the_mode_for_its_device(monkeypatch, tmp_path):
    calls = []

    def recorder(model, mode=None, **kwargs):
        calls.append((model, mode))
        return model

    monkeypatch.setattr(run_module.torch, "compile", recorder)
    model = torch.nn.Linear(2, 2)
    for compile_, mode, expected in ((True, "reduce-overhead", "default"), (True, "auto", "default"),
                                     (True, "max-autotune", "max-autotune-no-cudagraphs"), (False, "auto", None)):
        cfg = RunConfig(data=str(tmp_path), out=str(tmp_path / "run"), device="cpu", compile=compile_,
                        compile_mode=mode)
        calls.clear()
        assert TrainingRun(cfg).train_view(model) is model
        assert calls == ([(model, expected)] if compile_ else [])  # CPU: CUDA-graph modes fall back
