"""Llama-style RMSNorm with a leaner backward pass (same forward arithmetic)."""

from __future__ import annotations

import types

import torch

from . import rebuild, same_code
from .checked import checked


def _scaled(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """The norm's output from its input and inverse RMS, as the forward pass computes it (normalised in fp32,
    cast back, then scaled): what a consumer rebuilds (:mod:`.rebuild`)."""
    return weight * (x.float() * rstd).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm (fp32 statistics, output cast back, then scaled), keeping only the input and one
    scalar per token for the backward pass instead of fp32 copies of the whole activation. Returns the inverse
    RMS too (no gradient), which a consumer needs to rebuild the output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return weight * (x32 * rstd).to(x.dtype), rstd  # _scaled's arithmetic, with the fp32 copy made once

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_rstd: None):
        # d/dx of x * rstd, with g the gradient there: rstd * g - rstd^3 * x * sum(g * x) / d. Written over g in
        # place, and without the normalised x (which only the weight's gradient needs): four passes over the
        # activation instead of seven (1.35 against 2.47 ms on [896, 512] fp32, BENCHMARKS.md).
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        g = (grad * weight).float()
        dot = (g * x32).sum(-1, keepdim=True)
        grad_x = g.mul_(rstd).addcmul_(x32, dot.mul_(rstd.pow(3)).div_(x.shape[-1]), value=-1)
        grad_w = None
        if ctx.needs_input_grad[1]:
            xhat = (x32 * rstd).to(x.dtype).float()
            grad_w = (grad.float() * xhat).sum(dim=tuple(range(grad.dim() - 1))).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    out, rstd = _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    # the projections that read the output may rebuild it in their backward pass rather than keep it
    return rebuild.attach(out, _scaled, hidden_states, self.weight, rstd)


def fuse_rms_norms(model) -> int:
    """Give Llama-style RMSNorm modules a leaner backward; returns how many were changed.

    Only modules whose ``forward`` is byte for byte Llama's (Mistral, Qwen2/3, Phi-3 and others copy it) are
    changed; any other normalisation keeps its own code. Saves two fp32 copies of the hidden state per norm
    per token and a few elementwise passes, and the output itself where every layer that reads it rebuilds it
    (:mod:`.rebuild`).
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if not checked(LlamaRMSNorm.forward):
        return 0
    count = 0
    for module in model.modules():
        if same_code(type(module).forward, LlamaRMSNorm.forward) and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            count += 1
    return count




def references() -> list:
    """The transformers functions this rewrite recognises modules by (see :mod:`.checked`)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return [LlamaRMSNorm.forward]
