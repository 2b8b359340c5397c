"""Shared pytest fixtures and settings for the whole suite.

Add a fixture here only when several test files need it; keep each one small and say what it guarantees.
"""

from __future__ import annotations

import os

# Set before any test imports huggingface_hub/transformers/datasets, which read these at import time: the
# suite must never reach a hub, and a test that tries should fail loudly instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # silences the fork warning in DataLoader tests
# No fsync in the suite's registry writes, nor in the processes it starts (they inherit it): fsync only matters
# after a power cut, and costs ~8 ms a file here. test_registry.py checks that durability is the default, and
# test_registry_stress.py turns it back on for the real publish path.
os.environ["FINETUNE_FSYNC"] = "0"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import finetune  # noqa: E402

# The files that take longest (the Ray cluster's scenarios ~2.7 min, the browser journey): under pytest-xdist they
# start first, one worker each, while the other files fill in around them (longest first is what keeps the workers
# busy to the end).
LONGEST_FILES = ("test_cluster.py", "test_web_browser.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` on machines without CUDA (torch is imported only if such tests exist). Under
    pytest-xdist, the longest files come first, then the files whose tests are all ``slow``."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # The workers are handed whole files in this order (every worker sorts alike; see LONGEST_FILES).
        files: dict[Path, bool] = {}
        for item in items:
            files[item.path] = files.get(item.path, True) and item.get_closest_marker("slow") is not None
        items.sort(key=lambda item: (item.path.name not in LONGEST_FILES, not files[item.path]))
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With pytest-xdist (``-n auto``), each test file runs whole on one worker: its module fixtures (a trained
    registry, a server and its inference worker, the Ray cluster of test_cluster.py) are built once, as in a
    serial run, not once per worker that got one of its tests."""
    from xdist.scheduler import LoadFileScheduling

    # xdist would hand the files out by their number of tests (many short tests first), not in the order above
    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run torch on one thread: tiny models gain nothing from a second OpenMP thread, which on 2 cores
    shared with other jobs waits for a core at every op (a 64x64 matmul measured 23 ms with 2 threads, 2 us
    with 1); one thread also sums in a fixed order. Subprocesses keep their own defaults."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 64, 2 layers, random init, seed 0) + trained tokenizer, as a Hugging Face folder.

    Built once per session and shared by every test: treat it as read-only (copy it before changing it).
    Its tokenizer is trained on the shipped sample data, so quickstart-style prompts tokenize compactly.
    """
    from finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_layers=2, num_heads=4)


@pytest.fixture
def registry(tmp_path: Path) -> finetune.Registry:
    """An empty registry in this test's own temporary folder."""
    return finetune.Registry(tmp_path / "registry")


@pytest.fixture
def live_server(tmp_path: Path):
    """A real server on 127.0.0.1 (free port) over an empty registry in ``tmp_path``, with accounts alice and
    bob (one token each). See tests/service.py for its methods (``http(owner)``, ``replicate(owner)``)."""
    from service import running_server

    with running_server(finetune.Registry(tmp_path / "registry")) as server:
        yield server


@pytest.fixture
def fake_executor(monkeypatch: pytest.MonkeyPatch):
    """Servers started in this test run their trainings on a fake executor (tests/helpers.py: one slot, nothing
    trains, no worker process): for what the queue and the API decide, not what the workers do."""
    from helpers import FakeExecutor

    from finetune.server import training_service

    executor = FakeExecutor(capacity=1)
    monkeypatch.setattr(training_service, "LocalExecutor", lambda root, workers=None, prestart=True: executor)
    return executor
