"""Several processes: torchrun + DistributedDataParallel on CPU (gloo), two ranks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ikdmil.device import Distributed
from ikdmil.engine.loop import make_loader


def test_distributed_sampler_shards_the_data():
    data = torch.utils.data.TensorDataset(torch.arange(10))
    seen = []
    for rank in range(2):
        loader, _ = make_loader(data, 3, True, 0, 0, torch.device("cpu"), Distributed(rank=rank, world=2))
        seen.append(sorted(int(v) for (batch,) in loader for v in batch))
    assert len(seen[0]) == len(seen[1]) == 5
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(10))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_torchrun_two_ranks_train_and_distill(tiny_synth, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ikdmil", "run", str(tiny_synth), "--out", str(out), "--input-size", "32", "--batch-size", "3",
           "--pretrained", "none", "--teacher-epochs", "2", "--fusion-epochs", "1", "--distill-epochs", "2",
           "--swap-every", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert set(results["models"]) == {"teacher", "student"}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 + 1 + 2  # one writer: no duplicated rows
    assert proc.stdout.count("test split") == 1  # only rank 0 reports


def test_memory_loader_shards_and_matches_the_dataset():
    import numpy as np

    from ikdmil.engine.loop import MemoryLoader

    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10) % 2
    seen = []
    for rank in range(2):
        loader = MemoryLoader(images, labels, 3, seed=0, device=torch.device("cpu"),
                              dist=Distributed(rank=rank, world=2))
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        for x, y, index in batches:
            assert x.dtype == torch.uint8 and x.shape[1:] == (3, 8, 8)
            assert torch.equal(x, torch.from_numpy(images[index.numpy()]).permute(0, 3, 1, 2))
            assert torch.equal(y, torch.from_numpy(labels[index.numpy()]))
        seen.append(sorted(int(i) for _, _, index in batches for i in index))
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(10))


def test_pipeline_with_the_memory_loader(tiny_synth, tmp_path, tiny_config):
    from ikdmil.engine.loop import MemoryLoader
    from ikdmil.engine.pipeline import Pipeline

    pipe = Pipeline(tiny_config(tiny_synth, tmp_path / "run", loader="memory", teacher_epochs=1, distill_epochs=1),
                    progress=False)
    results = pipe.run()
    assert isinstance(pipe.loader, MemoryLoader)
    assert results["models"]["student"]["test"]["n"] > 0
