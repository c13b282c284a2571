"""Real data in CI: prepare ../shared/data/glas and run a few training steps of both stages on it."""

import json

from ikdmil.engine.pipeline import Pipeline
from ikdmil.prepare.glas import prepare_glas


def test_glas_prepare_and_train_a_few_steps(glas_dir, tmp_path, tiny_config):
    manifest = prepare_glas(glas_dir, tmp_path / "glas", progress=False)
    cfg = tiny_config(manifest, tmp_path / "run", input_size=64, batch_size=16, teacher_epochs=1,
                      fusion_epochs=1, distill_epochs=1, eval_sigma=3.0)
    results = Pipeline(cfg, progress=False).run()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    test = saved["models"]["student"]["test"]
    assert test["n"] == 80 and test["n_pos"] == 43 and test["n_neg"] == 37
    for role in ("teacher", "student"):
        s = saved["models"][role]["test"]
        assert 0.0 <= s["f1"] <= 1.0 and 0.0 <= s["iou"] <= s["f1"] + 1e-9
    assert results["selection_metric"] == "val F1"
