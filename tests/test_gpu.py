"""The CUDA path: training in bf16 on the GPU and loading a version there. Skipped without CUDA."""

import pytest

from finetune.config import config_from_dict
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

pytestmark = pytest.mark.gpu


def test_train_and_load_on_gpu(tiny_model_dir, registry):
    import torch

    import finetune
    from finetune.training import train

    import_base(registry, "local/tiny", str(tiny_model_dir))
    cfg = config_from_dict({"base_model": "local/tiny:1", "data": {"path": str(sample_data_path())},
                            "train": {"max_steps": 3, "batch_size": 4}})
    result = train(cfg, registry=registry, destination="gpu/run", create_destination=True, progress=False)
    metrics = result.version.metadata["metrics"]
    assert metrics["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    model, _ = finetune.load(result.version.ref, device="gpu", registry=registry)
    assert next(model.parameters()).device.type == "cuda"
