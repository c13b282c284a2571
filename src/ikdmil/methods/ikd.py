"""IKD-MIL (the default method): MIL teacher -> fusion-weight fit -> iterative fusion-knowledge
distillation with teacher/student swaps. The phases live in `ikdmil.engine.pipeline.Pipeline`."""

from __future__ import annotations

from ikdmil.config import RunConfig
from ikdmil.methods.registry import register_method


@register_method("ikd", summary="MIL teacher, fusion-weight fit, iterative fusion-knowledge distillation")
def train_ikd(cfg: RunConfig, *, resume: bool = False, progress: bool = True, **options) -> dict:
    """Run IKD-MIL into `cfg.out`; `options` are Pipeline's (first_phase, last_phase, teacher_file)."""
    from ikdmil.engine.pipeline import Pipeline

    return Pipeline(cfg, resume=resume, progress=progress, **options).run()
