"""The README's test command is the one CI runs, and its demo command really runs `ikdmil demo`."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    assert ci_command in readme.splitlines()
    assert "pytest" in ci_command and "torch==2.13.0" in ci_command


def test_readme_demo_command_installs_and_runs_demo():
    lines = (ROOT / "README.md").read_text().splitlines()
    demo = [line for line in lines if line.endswith("ikdmil demo") and "pip install" in line]
    assert demo, "README must open with one command that installs and runs `ikdmil demo`"
    assert "torch==2.13.0" in demo[0]
