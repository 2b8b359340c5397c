"""Loading a base model for LoRA training or inference, and the loss that trains it.

Three choices here decide most of the speed and memory of a run:

* The frozen base weights are held in the compute dtype (bf16 where the device does it well) instead of fp32
  master copies cast at every step; only the LoRA adapters (and their optimizer state) stay fp32.
* Packed rows: several sequences share one row, each attending only to itself. Position ids restart at every
  sequence, and our ``varlen`` attention runs causal attention per sequence (no padding, no dense
  block-diagonal mask to build or to multiply by zero).
* The loss projects to the vocabulary only at positions that have a label, in chunks, so the full
  ``tokens x vocab`` fp32 logits are never materialised.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .batching import IGNORE_INDEX
from .errors import ModelLoadError, one_line
from .sources import BaseSource

VARLEN_ATTENTION = "finetune_varlen"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Above this many logits (label positions x vocabulary) per micro-batch, the loss is computed in chunks whose
# logits are recomputed in the backward pass instead of kept.
_LOGITS_BUDGET = 32 * 1024 * 1024


def choose_precision(requested: str, device: torch.device) -> str:
    """Resolve ``auto`` to what the device does well: bf16 on GPUs and CPUs with native bf16, else fp16/fp32."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ModelLoadError("precision fp16 needs a GPU", "use precision: auto, bf16 or fp32 on the CPU")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and _cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def _cpu_has_native_bf16() -> bool:
    # oneDNN reports bf16 only with AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower than fp32.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def torch_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def _varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence. Shapes: (batch, heads, tokens, head_dim), batch == 1."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if cu_seq_lens_q is None:  # an unpacked call (e.g. generation): plain causal or masked attention
        causal = attention_mask is None and query.shape[2] > 1
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=scaling
        )
        return out.transpose(1, 2).contiguous(), None
    assert query.shape[0] == 1, "packed micro-batches are a single row"
    # split (not slicing): its backward is one concatenation, where slices would each zero-fill a full-size
    # gradient and add it up.
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    attend = _causal_attention_math if query.device.type == "cpu" else _causal_attention_sdpa
    parts = [
        attend(q, k, v, dropout, scaling)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _causal_attention_sdpa(q, k, v, dropout: float, scaling: float | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)


# Measured on a 2-core AVX512-BF16 CPU, in whole training steps of the benchmark model (hidden 512, 8 heads):
# per-sequence math attention for all sequences up to 512 tokens ran ~15% faster than SDPA's CPU flash kernel,
# and the process peaked ~17% lower. (In isolation the flash kernel wins from ~200 tokens up; inside a step it
# does not.) Score matrices grow with the square of the length, so long sequences still take the flash kernel.
_MATH_MAX_LEN = 1024


# Sequences are padded at their end to a multiple of this inside attention. Causal attention never lets a real
# token see the padding (it lies in its future), so results are exact; but the matmul shapes take a few dozen
# values instead of hundreds, and oneDNN, which caches kernels and buffers per shape, stays small.
_LEN_QUANTUM = 32


@functools.lru_cache(maxsize=64)
def _future_mask(n: int, device: torch.device) -> torch.Tensor:
    """``True`` above the diagonal: the positions each query must not see. Few sizes occur (see _LEN_QUANTUM)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def _causal_attention_math(q, k, v, dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal attention as two batched matmuls and a softmax accumulated in fp32.

    For short sequences this beats SDPA's CPU flash kernel, whose fixed costs dominate there (see
    ``_MATH_MAX_LEN``); longer ones go to the flash kernel.
    """
    n = q.shape[2]
    if n > _MATH_MAX_LEN or dropout > 0:
        return _causal_attention_sdpa(q, k, v, dropout, scaling)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    pad = (-n) % _LEN_QUANTUM
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    m = n + pad
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    future = _future_mask(m, q.device)
    # Softmax in the activations' dtype: the kernel accumulates in fp32 either way, and its output is the one
    # tensor that both backward passes (softmax's and the matmul's) keep, so no fp32 copy is saved.
    probs = torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)
    out = torch.matmul(probs, v)
    return out[:, :, :n] if pad else out


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def register_varlen_attention() -> None:
    """Make ``attn_implementation="finetune_varlen"`` available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _no_mask)


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


def fuse_lora_updates(model) -> int:
    """Route plain LoRA linears through one fused multiply-accumulate; returns how many layers were routed.

    peft computes ``base(x) + lora_B(lora_A(x)) * scaling``: besides the two small matmuls, that is a full-size
    multiply and a full-size add per adapted layer, forward and backward. ``addmm`` folds both into the B
    matmul (``base(x) + scaling * h @ B.T`` in one kernel). Anything but the plain case (dropout, DoRA and
    other variants, several adapters, merged weights, extra arguments) keeps peft's own forward.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # the exact class: quantised and other subclasses keep their path
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def _fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (
        not args and not kwargs and name is not None and not self.disable_adapters and not self.merged
        and name in self.lora_A and name not in self.lora_variant
        and isinstance(self.lora_dropout[name], nn.Identity) and self.lora_B[name].bias is None
        and (x.dtype == self.lora_A[name].weight.dtype or torch.is_autocast_enabled(x.device.type))
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    h = F.linear(x, self.lora_A[name].weight)
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                        self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return fused.view(result.shape)


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm (fp32 statistics, output cast back, then scaled), keeping only the input and one
    scalar per token for the backward pass instead of fp32 copies of the whole activation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = (grad * weight).float()
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad.float() * xhat.to(x.dtype).float()).sum(dim=tuple(range(grad.dim() - 1))).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model) -> int:
    """Give Llama-style RMSNorm modules a leaner backward; returns how many were changed.

    Only modules whose ``forward`` is byte for byte Llama's (Mistral, Qwen2/3, Phi-3 and others copy it) are
    changed; any other normalisation keeps its own code. Saves two fp32 copies of the hidden state per norm
    per token and a few elementwise passes.
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama_code = LlamaRMSNorm.forward.__code__
    count = 0
    for module in model.modules():
        code = getattr(type(module).forward, "__code__", None)
        if (code is not None and code.co_code == llama_code.co_code and code.co_consts == llama_code.co_consts
                and code.co_names == llama_code.co_names and hasattr(module, "variance_epsilon")):
            module.forward = types.MethodType(_rms_norm_forward, module)
            count += 1
    return count


def keep_activations_in_compute_dtype(model) -> None:
    """Stop peft from casting every LoRA input to the adapter's fp32 dtype.

    Under autocast the adapter matmuls run in bf16/fp16 anyway, so the cast only costs two full-size copies of
    each adapted layer's input (to fp32 and back) in the forward pass and again in the backward pass.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


class CausalLMLoss(nn.Module):
    """Wraps a (PEFT) causal LM so that ``forward`` returns ``(summed token loss, label token count)``.

    Living in one module's ``forward`` matters for DistributedDataParallel, whose gradient hooks are armed by
    the wrapped forward call.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._decoder = inner.get_decoder()
        self._head = inner.get_output_embeddings()
        self._softcap = getattr(inner.config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs: dict[str, Any] = {}
        if cu_seq_lens is not None:
            kwargs["cu_seq_lens_q"] = cu_seq_lens
        hidden = self._decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **kwargs
        ).last_hidden_state
        # Position t predicts token t+1. Packed rows mark the first token of each sequence IGNORE_INDEX in
        # `labels`, so no sequence is asked to predict its neighbour's first token.
        targets = labels[:, 1:].reshape(-1)
        keep = targets != IGNORE_INDEX
        selected = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
        return self.token_loss(selected, targets[keep]), keep.sum()

    def token_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of ``hidden`` rows against ``targets``, chunked above the logits budget."""
        vocab = self._head.weight.shape[0]
        if hidden.shape[0] * vocab <= _LOGITS_BUDGET or not torch.is_grad_enabled():
            return self._chunk_loss(hidden, targets)
        rows = max(1, _LOGITS_BUDGET // vocab)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], rows):
            total = total + checkpoint(
                self._chunk_loss, hidden[start : start + rows], targets[start : start + rows], use_reentrant=False
            )
        return total

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return F.cross_entropy(logits, targets, reduction="sum")


def normalize_loss(loss_sum: torch.Tensor, window_label_tokens: int, world_size: int) -> torch.Tensor:
    """Scale one micro-batch's summed loss so that accumulated gradients equal those of one big batch.

    Every micro-batch of an optimizer step (on every process) divides by the label tokens of the whole step,
    so long and short micro-batches weigh by their tokens, not equally. DistributedDataParallel averages
    gradients over processes, which the ``world_size`` factor undoes.
    """
    return loss_sum * (world_size / max(window_label_tokens, 1))
