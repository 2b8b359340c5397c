"""Causal attention within each sequence of a packed row, registered with transformers as ``finetune_varlen``.

Packed rows hold several sequences end to end (see :mod:`finetune.batching`); position ids restart at every
sequence and ``cu_seq_lens`` marks the boundaries. Each sequence attends only to itself: no padding, and no dense
block-diagonal mask to build or to multiply by zero. On GPUs every sequence goes to SDPA's flash kernel; on CPUs
short sequences take a plain two-matmul path that is faster there (see ``_math_max_len``). Sliding windows are
honoured; what this path cannot compute (soft-capped logits, attention sinks, bidirectional attention) stops
training with an error rather than training on something else.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import PackingError
from . import evaluating

VARLEN_ATTENTION = "finetune_varlen"
PACKING_HINT = "set train.packing: auto (the default) or false to train it on padded batches"

# Inside whole bf16 training steps on CPUs, per-sequence math attention beat SDPA's CPU flash kernel in speed and
# peak memory for every length tried (BENCHMARKS.md), though in isolation the flash kernel wins on longer
# sequences. In fp32 the two run alike from ~256 tokens up (alone and in whole steps), and the math path keeps an
# fp32 score matrix per head for the backward pass, the square of the length: from there the flash kernel, which
# keeps one number per query, takes them (Qwen2 on the benchmark: peak RSS -80 MB at equal speed).
_MATH_MAX_LEN = 1024
_MATH_MAX_LEN_FP32 = 256


def _math_max_len(dtype: torch.dtype) -> int:
    return _MATH_MAX_LEN_FP32 if dtype == torch.float32 else _MATH_MAX_LEN

# In bf16 and fp16, sequences are padded at their end to a multiple of this inside attention. Causal attention
# never lets a real token see the padding (it lies in its future), so results are exact; but the matmul shapes
# take a few dozen values instead of hundreds, and oneDNN, which runs those matmuls and caches kernels and
# buffers per shape, stays small. fp32 matmuls go to MKL, which keeps no such cache: there the padding only
# cost score FLOPs and copies (unpadded was 4-5% faster per step, BENCHMARKS.md), so fp32 is not padded.
_LEN_QUANTUM = 32


def _len_quantum(dtype: torch.dtype) -> int:
    return 1 if dtype == torch.float32 else _LEN_QUANTUM


def register_varlen_attention() -> None:
    """Make ``attn_implementation="finetune_varlen"`` available to transformers models."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _no_mask)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def _varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed sequence. Shapes: (batch, heads, tokens, head_dim), batch == 1; keys
    and values may have fewer heads than queries (grouped-query attention), and are never repeated to match.
    ``sliding_window`` (Mistral, Qwen2 and others pass it): a query sees only the last that many keys, itself
    included, as transformers' own attention does."""
    _refuse_unsupported(module, kwargs)
    gqa = key.shape[1] != query.shape[1]
    if cu_seq_lens_q is None:  # an unpacked call (e.g. generation): plain causal or masked attention
        causal = attention_mask is None and query.shape[2] > 1
        if attention_mask is None and sliding_window is not None and key.shape[2] > sliding_window:
            attention_mask, causal = _causal_bias(query.shape[2], key.shape[2], sliding_window, query.dtype,
                                                  query.device), False
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal, scale=scaling,
            enable_gqa=gqa,
        )
        return out.transpose(1, 2).contiguous(), None
    assert query.shape[0] == 1, "packed micro-batches are a single row"
    # split (not slicing): its backward is one concatenation, where slices would each zero-fill a full-size
    # gradient and add it up.
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    attend = _causal_attention_math if query.device.type == "cpu" else _causal_attention_sdpa
    parts = [
        attend(q, k, v, dropout, scaling, sliding_window)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2))
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


# What the packed path cannot compute exactly. Rather than ignore them (silently wrong), training stops at the
# first step and says so: transformers' SDPA refuses ``softcap`` the same way.
_UNSUPPORTED = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks",
                "position_bias": "a position bias"}


def _refuse_unsupported(module: nn.Module, kwargs: dict[str, Any]) -> None:
    found = [what for key, what in _UNSUPPORTED.items() if kwargs.get(key) is not None]
    causal = kwargs.get("is_causal")  # None: the module's own setting, as transformers' attention reads it
    if not (getattr(module, "is_causal", True) if causal is None else causal):
        found.append("bidirectional attention")
    if found:
        raise PackingError(f"packed attention ({VARLEN_ATTENTION}) cannot train {type(module).__name__}: it uses "
                             f"{' and '.join(found)}", PACKING_HINT)


def refuse_inexact_packing(model: nn.Module) -> None:
    """Stop with a one-line reason if packing would not be exact for ``model`` (loaded with this attention).

    Packed rows are exact only if no sequence's outputs depend on the sequences before it in the row. This
    attention keeps sequences apart, but a model may also mix positions elsewhere: convolutions or recurrences
    along the sequence (LFM2, RecurrentGemma), linear attention (MiniMax). Checked by running the model on one
    sequence packed after each of two others: its logits must stay the same, up to rounding (BENCHMARKS.md,
    sixth session: exact families moved by 4e-7 of their largest logit at most, mixing ones by 1.4e-2 at
    least)."""
    embeddings = model.get_input_embeddings()
    vocab, device = embeddings.num_embeddings, embeddings.weight.device
    first, second = (((torch.arange(8) * step + 3) % vocab).to(device) for step in (7919, 104729))
    follower = ((torch.arange(8) * 15485863 + 5) % vocab).to(device)
    positions = torch.cat([torch.arange(8), torch.arange(8)]).unsqueeze(0).to(device)
    bounds = torch.tensor([0, 8, 16], dtype=torch.int32, device=device)
    with evaluating(model):
        logits = [model(input_ids=torch.cat([before, follower]).unsqueeze(0), position_ids=positions,
                        cu_seq_lens_q=bounds, use_cache=False).logits[0, 8:].float()
                  for before in (first, second)]
    moved = (logits[0] - logits[1]).abs().max() / logits[1].abs().max().clamp(min=1e-6)
    if moved > 1e-4:
        raise PackingError(
            f"packed attention ({VARLEN_ATTENTION}) cannot train {type(model).__name__}: a sequence's outputs "
            "depend on the sequences packed before it (layers that mix positions outside attention)",
            PACKING_HINT)


def _causal_attention_sdpa(q, k, v, dropout: float, scaling: float | None,
                           window: int | None = None) -> torch.Tensor:
    n = q.shape[2]
    mask = _causal_bias(n, n, window, q.dtype, q.device) if window is not None and window < n else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                          scale=scaling, enable_gqa=k.shape[1] != q.shape[1])


@functools.lru_cache(maxsize=64)
def _causal_bias(queries: int, keys: int, window: int | None, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """0 where a query may look, -inf elsewhere: at keys after it, and with a ``window``, at keys that many
    places or more before it (the queries are the last ``queries`` of the ``keys`` positions)."""
    offset = keys - queries
    bias = torch.full((queries, keys), float("-inf"), dtype=dtype, device=device).triu_(offset + 1)
    if window is not None and window < keys:
        past = torch.ones(queries, keys, dtype=torch.bool, device=device).tril_(offset - window)
        bias.masked_fill_(past, float("-inf"))
    return bias


@functools.lru_cache(maxsize=64)
def _future_bias(n: int, groups: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`_causal_bias` of a sequence with itself, stacked ``groups`` times (one per query head sharing a
    key/value head). Few sizes occur in bf16 (``_LEN_QUANTUM``); in fp32 the sizes are the sequences' own, and
    the cache keeps the most recent."""
    return _causal_bias(n, n, window, dtype, device).repeat(groups, 1)


def _causal_attention_math(q, k, v, dropout: float, scaling: float | None,
                           window: int | None = None) -> torch.Tensor:
    """Causal attention as two batched matmuls and a softmax accumulated in fp32.

    For short sequences this beats SDPA's CPU flash kernel, whose fixed costs dominate there (see
    ``_math_max_len``); longer ones go to the flash kernel. With grouped-query attention the query heads that
    share a key/value head are stacked along the query axis (``[kv_heads, groups * tokens, dim]``), so each
    key/value head is used as it is: no repeated copies, and their gradients come out of the matmuls summed.
    """
    n = q.shape[2]
    if n > _math_max_len(q.dtype) or dropout > 0:
        return _causal_attention_sdpa(q, k, v, dropout, scaling, window)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    pad = (-n) % _len_quantum(q.dtype)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    batch, heads, m, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads  # transformers' order: query head h uses key/value head h // groups
    # One kernel scales the scores and adds the causal mask (baddbmm), where a multiply and a masked fill would
    # each make a pass over the scores, forward and backward.
    scores = torch.baddbmm(_future_bias(m, groups, window if window is not None and window < n else None,
                                        q.dtype, q.device), q.reshape(batch * kv_heads, groups * m, dim),
                           k.reshape(batch * kv_heads, m, dim).transpose(1, 2), alpha=scale)
    # Softmax in the activations' dtype: the kernel accumulates in fp32 either way, and its output is the one
    # tensor that both backward passes (softmax's and the matmul's) keep, so no fp32 copy is saved.
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, v.reshape(batch * kv_heads, m, dim)).view(batch, heads, m, dim)
    return out[:, :, :n] if pad else out


def attention_path(config, device: torch.device, dtype: torch.dtype) -> str:
    """A short name for the attention a model trains with, for the training log."""
    implementation = getattr(config, "_attn_implementation", None) or "default"
    if implementation != VARLEN_ATTENTION:
        return implementation
    return f"varlen-math (<= {_math_max_len(dtype)} tokens, SDPA above)" if device.type == "cpu" else "varlen-sdpa"
