"""The last decoder layer's MLP only at the rows whose final hidden state the loss reads.

The loss looks at the final hidden state of labelled positions only (completions: often half the tokens of
instruction data or fewer). Every earlier layer is needed at every position, since later positions attend to
it; but in the last layer the MLP works on each position alone and its output goes nowhere but into that
position's final hidden state. So while :class:`~finetune.modeling.ops.loss.CausalLMLoss` runs, the last MLP
takes only the labelled rows, and its output is scattered back into zeros at full size: the other rows' final
hidden states are then wrong, and nothing reads them. Losses and gradients are unchanged (tests compare them
with the unchanged model). Outside the loss (generation, logits) the MLP sees every row as usual.

The row count is rounded up to a multiple of ``ROW_MULTIPLE`` with rows the loss does not read: oneDNN, which
runs bf16 products on CPUs (and fp32 ones through :mod:`~finetune.modeling.ops.gemm`), builds and caches a
kernel per product shape, and an exact count, different at every step, grew the process by ~330 MB over 33
bf16 steps (BENCHMARKS.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import base_of, same_code
from .checked import checked

_ATTR = "_finetune_loss_rows"
# Coarser than the packed rows' filler (data.batching.PACK_MULTIPLE, 64): with 64 the CLI's peak on the benchmark
# still grew by ~80 MB in bf16, with 256 it is where it was without this path; at most 255 extra rows in one MLP.
ROW_MULTIPLE = 256


class _RowSelection:
    """The rows (flat indices into ``batch x tokens``) the current loss reads; None outside the loss."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.shape: torch.Size | None = None

    def take(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.rows is None:
            return None
        (x,) = args
        self.shape = x.shape
        # as one row of a batch: MLPs may insist on (batch, tokens, features), as mixture-of-experts blocks do
        return (x.reshape(-1, x.shape[-1]).index_select(0, self.rows).unsqueeze(0),)

    def put_back(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None:
            return None
        out = out.reshape(-1, out.shape[-1])
        full = out.new_zeros(self.shape[:-1].numel(), out.shape[-1]).index_copy(0, self.rows, out)
        return full.view(*self.shape[:-1], out.shape[-1])


# Decoder layers whose MLP output only joins the final hidden state of its own position (through dropout, a
# per-position norm or a scale, or beside the attention's output in parallel-residual layers), checked by
# reading each; copies of them in other families (Mistral and Qwen2 copy Llama's) count, by their code.
KNOWN_LAYERS = (
    ("llama", "LlamaDecoderLayer"), ("gpt2", "GPT2Block"), ("stablelm", "StableLmDecoderLayer"),
    ("falcon", "FalconDecoderLayer"), ("gpt_neox", "GPTNeoXLayer"), ("phi3", "Phi3DecoderLayer"),
    ("olmo2", "Olmo2DecoderLayer"), ("granite", "GraniteDecoderLayer"), ("cohere", "CohereDecoderLayer"),
    ("gemma2", "Gemma2DecoderLayer"),
)


def last_mlp_on_loss_rows(model) -> bool:
    """Let the last decoder layer's MLP run on the loss's rows only (see the module's docstring); returns
    whether it applies: only to decoder layers whose ``forward`` is byte for byte one of ``KNOWN_LAYERS``."""
    layer = _last_layer(model)
    known = layer is not None and any(same_code(type(layer).forward, reference.forward)
                                      and checked(reference.forward) for reference in _known_layers())
    mlp = getattr(layer, "mlp", None) if known else None
    if not isinstance(mlp, nn.Module):
        return False
    if not hasattr(mlp, _ATTR):
        selection = _RowSelection()
        mlp.register_forward_pre_hook(selection.take)
        mlp.register_forward_hook(selection.put_back)
        setattr(mlp, _ATTR, selection)
    return True


def _known_layers() -> Iterator[type]:
    for family, name in KNOWN_LAYERS:
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:  # a transformers release without this family
            continue
        layer = getattr(module, name, None)
        if layer is not None:
            yield layer


def references() -> list:
    """The transformers functions this rewrite recognises layers by (see :mod:`.checked`)."""
    return [layer.forward for layer in _known_layers()]


@contextmanager
def loss_rows(model, read: torch.Tensor) -> Iterator[None]:
    """While inside, the last MLP (where :func:`last_mlp_on_loss_rows` applied) takes only the rows the loss
    reads (``read``: a flat boolean mask over ``batch x tokens``), and as few others as make the count a multiple
    of ``ROW_MULTIPLE``."""
    layer = _last_layer(model)
    selection = getattr(getattr(layer, "mlp", None), _ATTR, None)
    if selection is None:
        yield
        return
    selection.rows = mlp_rows(read)
    try:
        yield
    finally:
        selection.rows = selection.shape = None


def mlp_rows(read: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices of the rows marked in ``read`` and of the first unmarked ones, as many as round the
    count up to a multiple of ``ROW_MULTIPLE`` (or to every row)."""
    extra = (-int(read.sum())) % ROW_MULTIPLE
    if extra:
        unread = ~read
        read = read | (unread & (unread.cumsum(0) <= extra))
    return read.nonzero().squeeze(1)


def _last_layer(model) -> nn.Module | None:
    inner = base_of(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)  # Llama-style, GPT-2
    return layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None
