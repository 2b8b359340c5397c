"""The training loss: summed token cross-entropy at labelled positions, and its normalisation across a step.

The output layer projects to the vocabulary only where a label exists (completions are ~40% of the tokens in
instruction data), and with a frozen output layer the projection, the loss and the gradient with respect to the
hidden states are computed together, a chunk of rows at a time: no ``tokens x vocab`` fp32 logits are kept for
the backward pass, or even exist beyond one chunk.

That takes the logits to be the output layer applied to the decoder's last hidden state (soft-capped where the
config says so). Some models do more in their own ``forward`` (Cohere multiplies the logits by ``logit_scale``,
Granite divides them by ``logits_scaling``); :func:`logits_path` finds out by running the model once on a few
tokens, and such models take their own ``forward`` for the logits.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data.formats import IGNORE_INDEX
from ..precision import compute_dtype
from . import base_of, evaluating, gemm
from .loss_rows import loss_rows

# Rows of logits handled at a time by the loss. On CPUs small chunks stay in cache, so 128 rows beat both larger
# and smaller chunks (BENCHMARKS.md), and the step's peak falls, since the loss runs when every activation of the
# forward pass is alive. GPUs want large matmuls, so there the chunk is sized by its logits: 16M floats (64 MB
# per fp32 buffer, a few buffers alive at once) is 512 rows at a 32K vocabulary and 128 at 128K.
_CPU_CHUNK_ROWS = 128
_GPU_CHUNK_LOGITS = 16 * 1024 * 1024
# The matmuls take the chunk's rows at once, but on a CPU its fp32 softmax and loss take a band of rows at a time,
# of at most this many logits (16 MB per fp32 copy; the whole chunk up to a 32K vocabulary). At 128K a whole
# chunk's fp32 copies (the logits, their log-softmax, its gradient) are 64 MB each; in bands of 32 rows, 16 MB. On
# two shared cores 32-row bands took the time of whole chunks (median of 7: 3.7 s against 3.5 s for 512 rows at
# 128K), 8-row bands 1.7x as long (more, smaller operators, each a barrier for OpenMP's threads).
_CPU_BAND_LOGITS = 4 * 1024 * 1024


def _chunk_rows(vocab: int, device: torch.device) -> int:
    return _CPU_CHUNK_ROWS if device.type == "cpu" else max(_CPU_CHUNK_ROWS, _GPU_CHUNK_LOGITS // vocab)


class CausalLMLoss(nn.Module):
    """Wraps a (PEFT) causal LM so that ``forward`` returns ``(summed token loss, label token count)``.

    Living in one module's ``forward`` matters for DistributedDataParallel, whose gradient hooks are armed by
    the wrapped forward call.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        inner = base_of(model)
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
        # Position t predicts token t+1. Packed rows mark the first token of each sequence IGNORE_INDEX in
        # `labels`, so no sequence is asked to predict its neighbour's first token.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        read = targets != IGNORE_INDEX
        rows = read.nonzero().squeeze(1)
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                      **kwargs)
        targets, count = targets.index_select(0, rows), rows.new_tensor(rows.numel())
        with loss_rows(self.model, read):  # the last MLP needs no other rows (ops.loss_rows)
            if logits_path(self.model) == "model":
                logits = self._model_logits(inputs, rows)
                return F.cross_entropy(logits.float(), targets, reduction="sum"), count
            hidden = self._decoder(**inputs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        return self.token_loss(selected, targets), count

    def label_logps(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None,
                    cu_seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per labelled position: the fp32 log-probability of its target token, and the position's flat index
        over batch x tokens (position t predicts token t+1), for losses that weigh sequences apart (DPO). A frozen
        output layer runs fused with the log-softmax, as the token loss does (:class:`_HeadLogProbs`)."""
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        read = targets != IGNORE_INDEX
        rows = read.nonzero().squeeze(1)
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
                      **({} if cu_seq_lens is None else {"cu_seq_lens_q": cu_seq_lens}))
        targets = targets.index_select(0, rows)
        with loss_rows(self.model, read):
            if logits_path(self.model) == "model":
                logits = self._model_logits(inputs, rows).float()
                return -F.cross_entropy(logits, targets, reduction="none"), rows
            hidden = self._decoder(**inputs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        head = self._head
        if fuses_head(head):
            want_grad = torch.is_grad_enabled() and selected.requires_grad
            chunk = _chunk_rows(head.weight.shape[0], selected.device)
            return _HeadLogProbs.apply(selected, head.weight, targets, self._softcap, chunk, want_grad), rows
        logits = head(selected).float()  # a trained or wrapped output layer: plain autograd, whole logits
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return -F.cross_entropy(logits, targets, reduction="none"), rows

    def _model_logits(self, inputs: dict[str, Any], rows: torch.Tensor) -> torch.Tensor:
        """The model's own logits at ``rows`` (flat indices over batch x tokens), as ``[rows, vocab]``. A single
        row (packed batches) asks the model for those positions only, where its ``forward`` takes
        ``logits_to_keep``; otherwise whole logits are computed and the rows picked from them."""
        keep = inputs["input_ids"].shape[0] == 1 and _takes_logits_to_keep(base_of(self.model))
        logits = self.model(**inputs, **({"logits_to_keep": rows} if keep else {})).logits
        logits = logits.reshape(-1, logits.shape[-1])
        return logits if keep else logits.index_select(0, rows)

    def token_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the output layer's logits at ``hidden`` rows against ``targets``."""
        head = self._head
        rows = _chunk_rows(head.weight.shape[0], hidden.device)
        if fuses_head(head):
            want_grad = torch.is_grad_enabled() and hidden.requires_grad
            return _HeadCrossEntropy.apply(hidden, head.weight, targets, self._softcap, rows, want_grad)
        # A trained or wrapped output layer (LoRA on lm_head, modules_to_save): plain autograd, whole logits.
        logits = head(hidden).float()
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return F.cross_entropy(logits, targets, reduction="sum")


_FROM_HEAD = "_finetune_logits_from_head"  # on the inner model: the outcome of _logits_from_head, checked once


def logits_path(model: nn.Module, autocast: torch.dtype | None = None) -> str:
    """How :class:`CausalLMLoss` gets a model's logits: ``"fused"`` (a frozen output layer, fused with the
    cross-entropy), ``"autograd"`` (a trained or wrapped output layer: whole logits through autograd) or
    ``"model"`` (the model's ``forward`` does more than apply its output layer: that ``forward`` computes them).
    The last is found by running the model once on a few tokens (see :func:`_logits_from_head`), under
    ``autocast`` to that dtype when given, as training runs it; the answer is kept on the model."""
    inner = base_of(model)
    from_head = getattr(inner, _FROM_HEAD, None)
    if from_head is None:
        from_head = _logits_from_head(model, autocast)
        setattr(inner, _FROM_HEAD, from_head)
    if not from_head:
        return "model"
    return "fused" if fuses_head(inner.get_output_embeddings()) else "autograd"


def _logits_from_head(model: nn.Module, autocast: torch.dtype | None) -> bool:
    """Whether ``model``'s logits are its output layer applied to its decoder's last hidden state, soft-capped
    where the config says so: what the loss computes without the model's ``forward``. Checked on eight tokens,
    in eval mode (no dropout), without gradients."""
    inner = base_of(model)
    decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    seen: dict[str, Any] = {}

    def keep(name: str, value: Any) -> None:  # a hook returning something would replace the module's output
        seen.setdefault(name, value)

    hooks = [decoder.register_forward_hook(lambda m, args, out: keep("decoder", out[0])),
             head.register_forward_hook(lambda m, args, out: keep("head", (args[0], out)))]
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = ((torch.arange(1, 9) * 7919) % vocab).unsqueeze(0).to(device)
    try:
        with evaluating(model), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
    if "decoder" not in seen or "head" not in seen:
        return False  # the model did not go through them: nothing says its logits are theirs
    head_in, head_out = seen["head"]
    expected = head_out.float()
    softcap = getattr(inner.config, "final_logit_softcapping", None)
    if softcap:
        expected = torch.tanh(expected / softcap) * softcap
    return _same(head_in, seen["decoder"]) and _same(logits, expected)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal shapes and values, up to rounding (two ways of doing the same arithmetic in the same dtypes)."""
    if got.shape != want.shape:
        return False
    tol = 1e-4 if got.dtype == want.dtype == torch.float32 else 2e-2
    want = want.float()
    return bool((got.float() - want).abs().max() <= tol * want.abs().max().clamp(min=1e-6))


def _takes_logits_to_keep(inner: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def fuses_head(head: nn.Module) -> bool:
    """Whether the loss runs fused with this output layer (a frozen ``nn.Linear`` without bias); any other
    (trained, LoRA-wrapped, biased) takes plain autograd over whole logits."""
    return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad


def _head_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None, rows: int,
               want_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The frozen output layer over ``hidden``, ``rows`` rows at a time: the summed cross-entropy, each row's
    log-probability of its target (fp32), and (``want_grad``) each row's gradient of its cross-entropy with
    respect to its hidden state. The arithmetic is autograd's: logits in the compute dtype, softmax and loss in
    fp32, the logits' gradient cast back to the compute dtype for the matmul."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    every = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad = torch.empty_like(hidden) if want_grad else None
    dtype = compute_dtype(hidden)  # under autocast: the dtype the model's head would compute in
    w = weight.to(dtype)  # once, not per chunk
    band = _band_rows(weight.shape[0], rows, hidden.device)
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows].to(dtype), targets[start : start + rows]
        logits = gemm.linear(h, w, frozen=True)
        for a in range(0, logits.shape[0], band):  # rows are independent: the same arithmetic, band by band
            picked, d_logits = _rows_loss(logits[a : a + band], t[a : a + band], softcap, want_grad)
            total -= picked.sum()
            every[start + a : start + a + picked.shape[0]] = picked
            if want_grad:
                logits[a : a + band].copy_(d_logits)  # read already: their gradient, cast, takes their place
        if want_grad:
            grad[start : start + rows] = gemm.linear(logits, w.t(), frozen=True)
    return total, every, grad


def softmax_rows(vocab: int, device: torch.device) -> tuple[int, int]:
    """(rows of a chunk of the fused loss, rows of its softmax bands) for a vocabulary of ``vocab`` on ``device``."""
    rows = _chunk_rows(vocab, device)
    return rows, _band_rows(vocab, rows, device)


def _band_rows(vocab: int, rows: int, device: torch.device) -> int:
    """Rows of a chunk whose fp32 softmax runs at once: on a CPU as many as keep its fp32 copies of the logits
    at :data:`_CPU_BAND_LOGITS` (all the chunk's rows up to a 32K vocabulary; 32 at 128K)."""
    return rows if device.type != "cpu" else max(1, min(rows, _CPU_BAND_LOGITS // vocab))


def _rows_loss(logits: torch.Tensor, t: torch.Tensor, softcap: float | None,
               want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a band of rows' logits (compute dtype): each row's fp32 log-probability of its target, and
    (``want_grad``) the fp32 gradient of their summed cross-entropy with respect to the logits."""
    logits = logits.float()
    if softcap:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(1, t.unsqueeze(1))
    if not want_grad:
        return picked.squeeze(1), None
    d_logits = log_probs.exp_()  # softmax, in place of the log-probabilities
    d_logits.scatter_add_(1, t.unsqueeze(1), torch.full_like(picked, -1.0))
    if softcap:
        d_logits *= 1 - capped.square()
    return picked.squeeze(1), d_logits


class _HeadCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(softcap(hidden @ weight.T), targets))`` for a frozen ``weight``.

    The gradient with respect to ``hidden`` does not depend on anything but the upstream scale, so it is
    computed in the forward pass, chunk by chunk (:func:`_head_rows`), and backward only scales it.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                rows: int, want_grad: bool) -> torch.Tensor:
        total, _, grad = _head_rows(hidden, weight, targets, softcap, rows, want_grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # Scaled in fp32: a bf16 copy of the scale (1 / label tokens) would be off by up to 0.4%, the same way
        # for every element of the micro-batch.
        return (grad.float() * upstream).to(grad.dtype), None, None, None, None, None


class _HeadLogProbs(torch.autograd.Function):
    """Each row's ``log_softmax(softcap(hidden @ weight.T))`` at its target, for a frozen ``weight`` (fp32, one
    value a row): what a loss that weighs rows apart needs (DPO's per-sequence sums). As in
    :class:`_HeadCrossEntropy`, no ``rows x vocab`` logits outlive a chunk: each row's gradient is computed in the
    forward pass and backward scales it by that row's upstream gradient."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                rows: int, want_grad: bool) -> torch.Tensor:
        _, logps, grad = _head_rows(hidden, weight, targets, softcap, rows, want_grad)
        ctx.save_for_backward(grad)
        return logps

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # the stored gradient is the cross-entropy's, -log p's: the sign flips
        return (grad.float() * -upstream.unsqueeze(1)).to(grad.dtype), None, None, None, None, None


def normalize_loss(loss_sum: torch.Tensor, window_label_tokens: int, world_size: int) -> torch.Tensor:
    """Scale one micro-batch's summed loss so that accumulated gradients equal those of one big batch.

    Every micro-batch of an optimizer step (on every process) divides by the label tokens of the whole step,
    so long and short micro-batches weigh by their tokens, not equally. DistributedDataParallel averages
    gradients over processes, which the ``world_size`` factor undoes.
    """
    return loss_sum * (world_size / max(window_label_tokens, 1))
