"""Model files: safetensors with metadata, round trip, a foreign backbone refused."""

import pytest
import torch

from ikdmil.errors import IkdmilError
from ikdmil.models import create_model
from ikdmil.models.checkpoint import load_model, save_model


def test_model_file_roundtrip_and_foreign_file(tmp_path):
    torch.manual_seed(1)
    model, _ = create_model("vgg16", pretrained="none")
    path = save_model(model, tmp_path / "m.safetensors", input_size=64)
    loaded, meta = load_model(path)
    assert meta["input_size"] == 64 and meta["backbone"] == "vgg16"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(IkdmilError, match="resnet"):
        load_model(path, expect_backbone="resnet18")
