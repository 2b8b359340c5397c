"""Every config shipped in configs/ loads cleanly and says how to run it."""

from pathlib import Path

import pytest

from finetune.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "alpaca-qwen.yaml", "chat-smollm.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.base_model and cfg.data.path and cfg.destination


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run it:") and ("finetune" in first or "scripts/" in first), first
