"""MLP activations: Llama-style gated SiLU MLPs that keep one activation less for the backward pass, and
GPT-2's tanh-approximated GELU as one kernel."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from . import same_code


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` for the backward pass but not ``silu(gate)``, which is
    recomputed there (one cheap elementwise pass). The gradients are autograd's, operation for operation."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_gated_mlps(model) -> int:
    """Keep one activation less per token for the backward pass in Llama-style SiLU MLPs; returns how many.

    ``down(silu(gate(x)) * up(x))`` saves ``gate(x)``, ``silu(gate(x))`` and ``up(x)``, three tensors of the
    MLP's width per token and layer (the largest activations of a decoder); this keeps two. Only modules whose
    ``forward`` is byte for byte Llama's (Mistral and Qwen2/3 copy it) with a SiLU activation are changed.
    """
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    count = 0
    for module in model.modules():
        if (same_code(type(module).forward, LlamaMLP.forward)
                and type(getattr(module, "act_fn", None)) in (SiLUActivation, nn.SiLU)):
            module.forward = types.MethodType(_gated_mlp_forward, module)
            count += 1
    return count


def _tanh_gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def fuse_tanh_gelus(model) -> int:
    """Compute GPT-2's GELU (``gelu_new``) with PyTorch's one-kernel tanh GELU; returns how many modules.

    transformers writes it out as eight elementwise operations, each a full pass over the MLP's widest tensor
    and most of them saving their input for the backward pass; ``F.gelu(x, approximate="tanh")`` is the same
    formula in one pass that saves only ``x``. Only modules whose ``forward`` is byte for byte transformers'
    ``NewGELUActivation`` are changed.
    """
    from transformers.activations import NewGELUActivation

    count = 0
    for module in model.modules():
        if same_code(type(module).forward, NewGELUActivation.forward):
            module.forward = types.MethodType(_tanh_gelu_forward, module)
            count += 1
    return count
