"""A merged model as one GGUF file, for llama.cpp and Ollama (``finetune export REF OUT --format gguf``).

The ``gguf`` package does the file format (:class:`gguf.GGUFWriter`), the tensor names
(:func:`gguf.get_tensor_name_map`), the Q8_0 blocks (:func:`gguf.quants.quantize`) and the tokenizer
(:mod:`finetune.gguf_vocab`); this module is the glue: which Hugging Face families map to which llama.cpp
architecture, the hyperparameters each one reads, and the few layout changes llama.cpp expects of the weights.

* Llama and Mistral (llama.cpp's ``llama``): q/k rows go back to rotary pairs interleaved per head, the layout
  llama.cpp's rotary embedding reads (transformers stores each head's two halves one after the other).
* Gemma and Gemma 2: RMSNorm weights are stored plus one (transformers keeps ``w`` and multiplies by ``1 + w``).
* GPT-2: its Conv1D projections are stored transposed, as linear layers.
* Qwen2, Qwen3 and Phi-3 keep transformers' layout as it is.

Anything else is refused by :func:`check_supported` before a weight is read, naming the supported families, and
so are rotary scalings llama.cpp would apply differently (only linear scaling and Llama 3's are written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

QUANTIZATIONS = ("f16", "q8_0")


@dataclass(frozen=True)
class _Family:
    name: str  # for messages
    arch: str  # gguf.MODEL_ARCH member
    interleave_qk: bool = False  # Llama's rotary layout
    norm_plus_one: bool = False  # Gemma's RMSNorm
    conv1d: bool = False  # GPT-2's transposed projections


FAMILIES = {
    "llama": _Family("Llama", "LLAMA", interleave_qk=True),
    "mistral": _Family("Mistral", "LLAMA", interleave_qk=True),
    "qwen2": _Family("Qwen2", "QWEN2"),
    "qwen3": _Family("Qwen3", "QWEN3"),
    "gemma": _Family("Gemma", "GEMMA", norm_plus_one=True),
    "gemma2": _Family("Gemma 2", "GEMMA2", norm_plus_one=True),
    "phi3": _Family("Phi-3", "PHI3"),
    "gpt2": _Family("GPT-2", "GPT2", conv1d=True),
}
SUPPORTED = ", ".join(f"{f.name} ({key})" for key, f in FAMILIES.items())


def check_supported(config: Any, quantize: str) -> _Family:
    """The family of a transformers ``config``, or a UsageError saying why it cannot become a GGUF file."""
    if quantize not in QUANTIZATIONS:
        raise UsageError(f"unknown GGUF quantization {quantize!r}", f"use one of: {', '.join(QUANTIZATIONS)}")
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type or "")
    if family is None:
        raise UsageError(f"GGUF export does not support the {model_type or 'unknown'} architecture",
                         f"supported: {SUPPORTED}; export it with --format merged instead")
    rope = _rope(config)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear") and not (kind == "llama3" and family.arch == "LLAMA"):
        raise UsageError(f"GGUF export does not write {kind!r} rotary scaling ({model_type})",
                         "export it with --format merged instead")
    if family.arch == "GEMMA2":
        # llama.cpp scales queries by head_dim ** -0.5, or (hidden / heads) ** -0.5 for Gemma 2 27B's 46 layers
        scalar, head_dim = config.query_pre_attn_scalar, config.head_dim
        per_head = config.hidden_size // config.num_attention_heads
        if scalar != head_dim and not (config.num_hidden_layers == 46 and scalar == per_head):
            raise UsageError(f"GGUF export cannot write Gemma 2's query_pre_attn_scalar {scalar} "
                             f"(llama.cpp uses head_dim {head_dim})", "export it with --format merged instead")
    return family


def _rope(config: Any) -> dict[str, Any]:
    # transformers 5 keeps theta and scaling in rope_parameters; older configs in rope_theta and rope_scaling
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def write_gguf(path: Path, model: Any, vocab: Any, quantize: str, name: str, description: str) -> None:
    """Write ``model`` (a merged transformers causal LM in fp32) and ``vocab`` (:class:`GGUFVocab`) to ``path``."""
    import gguf

    config = model.config
    family = check_supported(config, quantize)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_safe_name(name, vocab))
    writer.add_description(description)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quantize == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hyperparameters(writer, config, family)
    vocab.add_to(writer)
    for gguf_name, array in _tensors(model, family, arch):
        _add_tensor(writer, gguf_name, array, quantize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# llama.cpp gives Phi-3's special tokens their attributes when the model's *name* says phi-3 or phi3, and stops
# loading if the vocabulary lacks one of them (a model named so on another family, or with another tokenizer).
_PHI3_TOKENS = (b"<unk>", b"<s>", b"</s>", b"<|endoftext|>")


def _safe_name(name: str, vocab: Any) -> str:
    lowered = name.lower()
    if ("phi3" in lowered or "phi-3" in lowered) and not set(_PHI3_TOKENS) <= set(vocab.tokens):
        return lowered.replace("phi-3", "phi 3").replace("phi3", "phi 3")
    return name


def _hyperparameters(writer: Any, config: Any, family: _Family) -> None:
    import gguf

    if family.arch == "GPT2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if family.arch == "GEMMA2":
        if config.attn_logit_softcapping:
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if family.arch in ("GEMMA2", "PHI3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)


def _tensors(model: Any, family: _Family, arch: Any):
    """(GGUF name, fp32 numpy array) for every weight, in llama.cpp's layout."""
    import gguf
    import torch

    config = model.config
    layers = config.n_layer if family.arch == "GPT2" else config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if family.arch == "LLAMA" and (_rope(config).get("rope_type") == "llama3"):
        yield "rope_freqs.weight", _llama3_rope_factors(config)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and (tied or family.arch in ("GEMMA", "GEMMA2")):
            continue  # llama.cpp reads the output layer from the embedding when the file has none
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UsageError(f"tensor {hf_name} of this {config.model_type} model has no GGUF name",
                             f"this model's layout differs from the {family.name} family's; "
                             "export it with --format merged instead")
        with torch.no_grad():
            data = tensor.detach().to(torch.float32).cpu()
            if family.interleave_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = _interleave(data, config.num_attention_heads)
            elif family.interleave_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = _interleave(data, config.num_key_value_heads or config.num_attention_heads)
            elif family.norm_plus_one and hf_name.endswith("norm.weight"):
                data = data + 1
            elif family.conv1d and data.ndim == 2 and hf_name.endswith(("c_attn.weight", "c_proj.weight",
                                                                         "c_fc.weight")):
                data = data.T
        yield gguf_name, data.contiguous().numpy()


def _interleave(w: Any, heads: int) -> Any:
    """Per head, rows [x0..x(d/2-1), y0..y(d/2-1)] -> [x0, y0, x1, y1, ...]: rotary pairs side by side."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama3_rope_factors(config: Any) -> Any:
    """Llama 3.1's per-frequency rotary scaling, as the divisors llama.cpp applies (``rope_freqs``)."""
    import numpy as np

    rope = _rope(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    base, factor = float(rope.get("rope_theta", 10000.0)), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope["original_max_position_embeddings"])
    factors = []
    for k in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (k / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _add_tensor(writer: Any, name: str, array: Any, quantize: str) -> None:
    """Vectors stay fp32 (llama.cpp wants norms and biases in full precision); matrices become f16, or Q8_0
    where rows split into whole 32-value blocks."""
    import gguf
    import numpy as np

    if array.ndim < 2:
        writer.add_tensor(name, array.astype(np.float32))
    elif quantize == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        blocks = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, array.astype(np.float16))
