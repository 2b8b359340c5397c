"""Loading a base model and its tokenizer for LoRA training or inference, and attaching the adapter.

The frozen base weights are held in the compute dtype (bf16 where the device does it well) instead of fp32
master copies cast at every step; only the LoRA adapters (and their optimizer state) stay fp32. The exact
rewrites of the training arithmetic live in :mod:`finetune.modeling.ops`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelLoadError, one_line
from ..registry.sources import BaseSource
from .ops.attention import VARLEN_ATTENTION, register_varlen_attention


def load_tokenizer(source: BaseSource):
    """The base model's tokenizer, as is. Its pad token may even be eos: padding is masked by position (see
    :mod:`finetune.batching`), never by comparing token ids, so the eos a model must learn stays a label."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.load_path, revision=source.revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {source.description}: {one_line(err)}") from None
    return tok


def load_base_model(source: BaseSource, dtype: torch.dtype, attn_implementation: str | None = None):
    """The frozen base model, in ``dtype``, with the requested attention implementation."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "revision": source.revision}
    if attn_implementation == VARLEN_ATTENTION:
        register_varlen_attention()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source.load_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load base model {source.description}: {one_line(err)}",
            "check that it exists (a registry ref, a local folder, or a hub id) and that the files are intact",
        ) from None
    model.requires_grad_(False)
    return model


def attach_lora(model, lora: Any, adapter_dir: str | None = None, trainable: bool = True):
    """Add a LoRA adapter: a fresh one from the ``lora`` config, or the one saved in ``adapter_dir``.

    Continuing from a fine-tune keeps training that adapter (no second adapter stacked on top).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    # peft keeps adapter weights in fp32 even when the base is bf16 (autocast_adapter_dtype), which is what we
    # want: low-precision frozen weights, full-precision trainable ones.
    return get_peft_model(model, cfg)


