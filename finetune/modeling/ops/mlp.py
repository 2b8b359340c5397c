"""MLP activations: Llama-style gated SiLU MLPs that keep fewer activations for the backward pass, and the
tanh-approximated GELU of GPT-2 and Bloom as one kernel."""

from __future__ import annotations

import inspect
import types

import torch
import torch.nn.functional as F
from torch import nn

from . import lora, same_code
from .checked import changed, checked


class _SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` for the backward pass but not ``silu(gate)``, which is
    recomputed there (one cheap elementwise pass). The gradients are autograd's, operation for operation."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _silu_mul(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        return _silu_mul_backward(grad, gate, up, F.silu(gate), ctx.needs_input_grad[:2])


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the product written over ``silu(gate)`` where the dtypes allow it: the same values,
    one buffer of the MLP's width less to take from the allocator (~1% of an fp32 Llama step, BENCHMARKS.md)."""
    silu = F.silu(gate)
    return silu.mul_(up) if silu.dtype == up.dtype and silu.shape == up.shape else silu * up


def _silu_mul_backward(grad, gate, up, silu, needs):
    """Gradients at ``gate`` and ``up`` of ``silu(gate) * up`` (autograd's arithmetic), written over the
    temporaries rather than into new buffers: ``silu`` (recomputed by the caller) is overwritten."""
    grad_gate = grad_up = None
    if needs[0]:
        grad_gate = grad * up
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    if needs[1]:
        grad_up = silu.mul_(grad) if silu.dtype == grad.dtype else grad * silu
    return grad_gate, grad_up


class _SiluMulLora(torch.autograd.Function):
    """``down(silu(gate) * up)`` for a down projection that takes the fused LoRA path (:mod:`.lora`), keeping
    only ``gate`` and ``up``: the down projection's input, which it would keep as a third tensor of the MLP's
    width, is recomputed in the backward pass from the two (one multiply, next to the ``silu(gate)`` that
    :class:`_SiluMul` recomputes there anyway). The arithmetic is the two functions', operation for operation."""

    @staticmethod
    def forward(ctx, gate, up, weight_in_out, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        act = _silu_mul(gate, up).reshape(-1, gate.shape[-1])
        out, kept = lora.linear_forward(act, weight_in_out, bias, lora_a, lora_b, scaling, dtype)
        ctx.save_for_backward(gate, up, *kept)
        ctx.scaling, ctx.dtype, ctx.param_dtypes = scaling, dtype, (lora_a.dtype, lora_b.dtype)
        return out  # 2-d: the caller shapes it (see lora._fused_lora_forward)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, h, w, a, b = ctx.saved_tensors
        silu = F.silu(gate)
        act = (silu * up).reshape(-1, gate.shape[-1]).to(ctx.dtype)
        needs = ctx.needs_input_grad
        grad_act, grad_a, grad_b = lora.linear_backward(grad, act, h, w, a, b, ctx.scaling,
                                                        (needs[0] or needs[1], needs[4], needs[5]), ctx.param_dtypes)
        del act
        grad_gate = grad_up = None
        if grad_act is not None:
            grad_act = grad_act.view(gate.shape).to(gate.dtype)
            grad_gate, grad_up = _silu_mul_backward(grad_act, gate, up, silu, needs[:2])
        return grad_gate, grad_up, None, None, grad_a, grad_b, None, None


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    fused = lora.fused_args(self.down_proj, gate)
    if fused is None:
        return self.down_proj(_SiluMul.apply(gate, up))
    out = _SiluMulLora.apply(gate, up, *fused)
    return out.view(*gate.shape[:-1], out.shape[-1])


def fuse_gated_mlps(model) -> int:
    """Keep fewer activations per token for the backward pass in Llama-style SiLU MLPs; returns how many.

    ``down(silu(gate(x)) * up(x))`` saves ``gate(x)``, ``silu(gate(x))``, ``up(x)`` and, for the down
    projection, ``silu(gate(x)) * up(x)``: four tensors of the MLP's width per token and layer (the largest
    activations of a decoder). This keeps two when the down projection takes the fused LoRA path, else three.
    Only the modules :func:`gated_mlps` finds are changed.
    """
    found = gated_mlps(model)
    for module in found:
        module.forward = types.MethodType(_gated_mlp_forward, module)
    return len(found)


def gated_mlps(model) -> list[nn.Module]:
    """The MLPs :func:`fuse_gated_mlps` rewrites: ``forward`` byte for byte Llama's (Mistral and Qwen2/3 copy
    it) with a SiLU activation."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    if not checked(LlamaMLP.forward):
        return []
    return [module for module in model.modules()
            if same_code(type(module).forward, LlamaMLP.forward)
            and type(getattr(module, "act_fn", None)) in (SiLUActivation, nn.SiLU)]


def _tanh_gelu_forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def fuse_tanh_gelus(model) -> int:
    """Compute the tanh-approximated GELU of GPT-2 (``gelu_new``) and Bloom with PyTorch's one-kernel tanh GELU;
    returns how many modules.

    transformers writes both out as elementwise operations, each a full pass over the MLP's widest tensor: GPT-2's
    eight through autograd, most of them saving their input; Bloom's eight forward and a dozen backward in its
    own autograd function. ``F.gelu(x, approximate="tanh")`` is the same formula in one pass each way, saving only
    ``x``. Only modules whose code (and for Bloom, the code of the function it calls) is byte for byte
    transformers' are changed.
    """
    from transformers.activations import NewGELUActivation

    count = 0
    for module in model.modules():
        forward = type(module).forward
        if (same_code(forward, NewGELUActivation.forward) and checked(NewGELUActivation.forward)) \
                or _is_bloom_gelu(forward):
            module.forward = types.MethodType(_tanh_gelu_forward, module)
            count += 1
    return count


def _is_bloom_gelu(forward) -> bool:
    """Whether ``forward`` is Bloom's ``BloomGelu.forward`` calling a ``GeLUFunction`` with Bloom's tanh GELU and
    its derivative, all by their code (a copy in another family counts only if it calls the same arithmetic)."""
    try:
        from transformers.models.bloom import modeling_bloom as bloom
    except ImportError:  # a transformers without Bloom
        return False
    if not same_code(forward, bloom.BloomGelu.forward) or changed(_bloom_references(bloom)):
        return False
    names = inspect.unwrap(forward).__globals__
    function = names.get("GeLUFunction")
    return (isinstance(function, type) and issubclass(function, torch.autograd.Function)
            and same_code(function.forward, bloom.GeLUFunction.forward)
            and same_code(function.backward, bloom.GeLUFunction.backward)
            and same_code(names.get("bloom_gelu_forward"), bloom.bloom_gelu_forward)
            and same_code(names.get("bloom_gelu_back"), bloom.bloom_gelu_back))


def _bloom_references(bloom) -> list:
    return [bloom.BloomGelu.forward, bloom.GeLUFunction.forward, bloom.GeLUFunction.backward,
            bloom.bloom_gelu_forward, bloom.bloom_gelu_back]


def references() -> list:
    """The transformers functions these rewrites recognise modules by (see :mod:`.checked`)."""
    from transformers.activations import NewGELUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    found = [LlamaMLP.forward, NewGELUActivation.forward]
    try:
        from transformers.models.bloom import modeling_bloom as bloom
    except ImportError:
        return found
    return found + _bloom_references(bloom)
