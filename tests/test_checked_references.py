"""The rewrites recognise transformers' code, and apply only while that code is what they were checked against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.modeling.ops import checked, references, rewrite_for_training


def test_every_reference_is_pinned_and_matches_this_transformers():
    """Fails on a transformers upgrade that changed a function a rewrite copies the arithmetic of: compare the new
    code with the rewrite, run tests/test_architectures.py, then record the new fingerprint in ops.checked."""
    refs = references()
    assert {checked.key(f) for f in refs} == set(checked.CHECKED), "a reference without a pin, or a stale pin"
    assert checked.changed(refs) == ()


def _reference(x):
    """Docstring."""
    return x + 1  # a comment


def _reworded(x):
    """Another docstring, and a comment below."""
    # the same arithmetic
    return x + 1


def _other(x):
    """Docstring."""
    return x + 2


def test_the_fingerprint_is_the_code_alone():
    assert checked.fingerprint(_reference) == checked.fingerprint(_reworded)
    assert checked.fingerprint(_reference) != checked.fingerprint(_other)


@pytest.fixture
def llama_rms_norm_changed(monkeypatch: pytest.MonkeyPatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setitem(checked.CHECKED, checked.key(LlamaRMSNorm.forward), "0" * 16)  # as if it had changed
    checked.checked.cache_clear()
    yield
    checked.checked.cache_clear()


def test_a_changed_reference_turns_its_rewrite_off_and_the_log_says_which(tiny_model_dir: Path,
                                                                          llama_rms_norm_changed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    paths = rewrite_for_training(model, "fp32", torch.device("cpu"))
    assert paths.rms_norms == 0 and paths.changed == ("LlamaRMSNorm.forward",)
    assert "rmsnorm 0 (5 LlamaRMSNorm unchanged)" in str(paths)
    assert str(paths).endswith("off where transformers' code is not the code they were checked against: "
                               "LlamaRMSNorm.forward")
    assert paths.rotary == model.config.num_hidden_layers  # the others stay on
