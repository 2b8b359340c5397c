"""Loading a base model and its tokenizer for LoRA training or inference, and attaching the adapter.

The frozen base weights are held in the compute dtype (bf16 where the device does it well) instead of fp32
master copies cast at every step; only the LoRA adapters (and their optimizer state) stay fp32. The exact
rewrites of the training arithmetic live in :mod:`finetune.modeling.ops`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, ModelLoadError, PackingError, one_line
from ..registry.sources import BaseSource
from .context import context_length
from .ops.attention import PACKING_HINT, VARLEN_ATTENTION, refuse_inexact_packing, register_varlen_attention


def load_tokenizer(source: BaseSource):
    """The base model's tokenizer, as is. Its pad token may even be eos: padding is masked by position (see
    :mod:`finetune.batching`), never by comparing token ids, so the eos a model must learn stays a label."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.load_path, revision=source.revision)
    except (OSError, ValueError) as err:
        _raise_if_offline(source, err)
        raise ModelLoadError(f"cannot load the tokenizer of {source.description}: {one_line(err)}") from None
    return tok


_OFFLINE_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled")


def _raise_if_offline(source: BaseSource, err: BaseException) -> None:
    """A hub model that is not in the local cache while the hub cannot be reached: say so in our own words
    (the hub client's advice names its own keyword arguments, which are no option of ours)."""
    chain, seen = [], err
    while seen is not None and len(chain) < 8:
        chain.append(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    if not any(name in _OFFLINE_ERRORS for name in chain):
        return
    repo = source.load_path
    flag = f" --revision {source.revision}" if source.revision else ""
    raise ModelLoadError(
        f"hub model {repo} is not in the local Hugging Face cache, and the hub cannot be reached (offline)",
        f"on a machine that is online run `hf download {repo}{flag}` (or unset HF_HUB_OFFLINE), "
        "or import a local folder with `finetune models import OWNER/NAME --from PATH`") from None


def base_context(source: BaseSource, tokenizer: Any = None) -> int | None:
    """The context length of the base model (:func:`~finetune.modeling.context.context_length` of its config,
    then ``tokenizer``), if they say."""
    return context_length(_base_config(source), tokenizer)


def _base_config(source: BaseSource):
    """The base model's config; None where it cannot be read (loading the model itself reports that properly)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.load_path, revision=source.revision)
    except (OSError, ValueError):
        return None


def load_base_model(source: BaseSource, dtype: torch.dtype, attn_implementation: str | None = None):
    """The frozen base model, in ``dtype``, with the requested attention implementation."""
    from transformers import AutoModelForCausalLM

    # use_kernels=False: with the `kernels` package installed (transformers 5.25 requires it) transformers swaps
    # the forward of its hub-kernel layers (RMSNorm, activations) back to the class's own at every train()/eval()
    # switch, undoing the rewrites that training applies after loading (ops.rewrite_for_training) while the log
    # still named them; and on GPUs it would fetch kernels from the Hub at load.
    kwargs: dict[str, Any] = {"dtype": dtype, "revision": source.revision, "use_kernels": False}
    packed = attn_implementation == VARLEN_ATTENTION
    if packed:
        register_varlen_attention()
        _refuse_unpackable(_causal_lm_class(source))  # before the weights load: some models fail on unknown names
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source.load_path, **kwargs)
    except (OSError, ValueError) as err:
        _raise_if_offline(source, err)
        raise ModelLoadError(
            f"cannot load base model {source.description}: {one_line(err)}",
            "check that it exists (a registry ref, a local folder, or a hub id) and that the files are intact",
        ) from None
    if packed:
        _refuse_unpackable(type(model))  # a class the config did not name (remote code)
        refuse_inexact_packing(model)  # attention through the interface, and still something else mixes positions
    model.requires_grad_(False)
    return model


def _causal_lm_class(source: BaseSource) -> type | None:
    """The transformers class that loads ``source`` as a causal LM, when its config names a known one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kind = type(_base_config(source))
    return MODEL_FOR_CAUSAL_LM_MAPPING[kind] if kind in MODEL_FOR_CAUSAL_LM_MAPPING else None


def _refuse_unpackable(model_class: type | None) -> None:
    """Packed rows need a model that hands our attention function its keyword arguments (the sequence bounds):
    transformers marks such models ``_supports_attention_backend``. The others run their own attention over the
    whole row (Bloom, Falcon, StableLM) or state-space and linear-attention layers (Mamba, Jamba, Qwen3-Next), so
    packed sequences would see one another."""
    check = getattr(model_class, "is_backend_compatible", None)
    if check is not None and not check():
        raise PackingError(
            f"packed attention ({VARLEN_ATTENTION}) cannot train {model_class.__name__}: transformers does not "
            "mark it as passing sequence bounds to its attention (its own attention, or layers such as state-space "
            "ones), so sequences packed into one row would see each other",
            PACKING_HINT)


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
        # GPT-2-style models store their projections as Conv1D ([in, out] weights); peft needs to be told, and
        # otherwise warns and flips the flag itself.
        fan_in_fan_out=any(_is_conv1d(m) for m in model.modules()),
    )
    # peft keeps adapter weights in fp32 even when the base is bf16 (autocast_adapter_dtype), which is what we
    # want: low-precision frozen weights, full-precision trainable ones.
    try:
        return get_peft_model(model, cfg)
    except ValueError as err:  # peft's NoMatchingPeftModuleError (a ValueError) and its other target checks
        if "target" not in str(err).lower():
            raise
        raise ConfigError([f"lora.target_modules: {lora.target_modules!r} matches no layer LoRA can adapt "
                           f"({one_line(err)}); this model's linear layers are {', '.join(linear_names(model))} "
                           "(or use all-linear)"]) from None


def linear_names(model) -> list[str]:
    """The distinct short names of a model's linear layers (what ``target_modules`` may list), but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if (isinstance(module, torch.nn.Linear) or _is_conv1d(module)) and module is not head})


def _is_conv1d(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


