"""`ikdmil experiment`: named variants x seeds (x backbones) -> tables (mean ± std) and plots.

- `variants`: the named variants (RunConfig overrides, one per table row or curve), the profiles
  (smoke | cpu | paper schedules) and the stage-1 key that lets variants share one MIL teacher.
- `runner`: `ExperimentSettings` (the CLI options), `Plan` (every run, checked before any work),
  `run_experiment(settings)` (resumable: finished runs are skipped).
- `tables`: table.md / table.csv / table.json, test scores selected on validation only.
- `plots`: validation and test F1 against epoch per ablation (the paper's Figs. 5-8).
"""

from ikdmil.experiment.runner import ExperimentSettings, Plan, add_experiment_args, run_experiment, settings_from_args
from ikdmil.experiment.variants import PROFILES, VARIANTS

__all__ = ["ExperimentSettings", "Plan", "PROFILES", "VARIANTS", "add_experiment_args", "run_experiment",
           "settings_from_args"]
