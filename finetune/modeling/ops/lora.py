"""LoRA linears with a fused forward and backward, and no per-layer input casts under autocast."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import compute_dtype
from . import gemm, rebuild


def fuse_lora_updates(model) -> int:
    """Route plain LoRA linears through a fused forward and backward; returns how many layers were routed.

    peft computes ``base(x) + lora_B(lora_A(x)) * scaling``: besides the two small matmuls, that is a full-size
    multiply and a full-size add per adapted layer, forward and backward. Here the update is accumulated into
    the base output by the B matmul itself (``addmm``), and with a frozen ``nn.Linear`` or GPT-2 ``Conv1D``
    base the backward is written out too (see ``_LoraLinear``). Anything but the plain case (dropout, DoRA and
    other variants, several adapters, merged weights, extra arguments) keeps peft's own forward; see
    :func:`lora_path` for which path a layer takes.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # the exact class: quantised and other subclasses keep their path
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def lora_path(module: nn.Module) -> str:
    """The path a routed LoRA layer takes in training: ``"fused"`` (one autograd function, frozen ``nn.Linear``
    or ``Conv1D`` base), ``"addmm"`` (autograd, the update folded into the B matmul: a trained or other base
    layer) or ``"peft"`` (peft's own forward: dropout, variants, several adapters, merged weights, or a layer
    :func:`fuse_lora_updates` did not route). Inputs of another dtype than the adapter's outside autocast also
    fall back to peft's forward at run time."""
    if not _routed(module):
        return "peft"
    name = _plain_adapter(module)
    if name is None:
        # A variant (DoRA) keeps peft's own forward: the log names it, so the fallback is visible.
        variant = next(iter(getattr(module, "lora_variant", {}).values()), None)
        if variant is None:
            return "peft"
        return f"peft, {type(variant).__name__.removesuffix('LinearVariant')} variant"
    return "fused" if _frozen_base(module.base_layer) is not None else "addmm"


def _routed(module: nn.Module) -> bool:
    """Whether :func:`fuse_lora_updates` routed this layer (its own ``forward`` is the fused one)."""
    return getattr(vars(module).get("forward"), "__func__", None) is _fused_lora_forward


def _plain_adapter(self) -> str | None:
    """The one active adapter's name when the layer is the plain LoRA case, else None."""
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (
        name is not None and not self.disable_adapters and not self.merged
        and name in self.lora_A and name not in self.lora_variant
        and isinstance(self.lora_dropout[name], nn.Identity) and self.lora_B[name].bias is None
    )
    return name if plain else None


def _frozen_base(base: nn.Module) -> bool | None:
    """For a frozen base layer the fused function can run: whether its weight is stored transposed (GPT-2's
    ``Conv1D`` keeps ``[in, out]``, ``nn.Linear`` ``[out, in]``). None for anything else."""
    from transformers.pytorch_utils import Conv1D

    kind = type(base)
    if kind is not nn.Linear and kind is not Conv1D:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return kind is Conv1D


def fused_args(module: nn.Module, x: torch.Tensor) -> tuple | None:
    """What :class:`_LoraLinear` takes after its input when ``module`` runs ``x`` through it (a routed plain
    LoRA layer over a frozen ``nn.Linear`` or ``Conv1D``, ``x`` in the adapter's dtype or under autocast): the
    base weight as ``[in, out]``, the bias, A, B, the scaling and the compute dtype. None otherwise."""
    if not _routed(module):
        return None
    name = _runnable_adapter(module, x)
    return None if name is None else _fused_args(module, name, x)


def _runnable_adapter(self, x: torch.Tensor) -> str | None:
    """The plain adapter's name when this layer may take a routed path for ``x``: peft casts inputs of another
    dtype than the adapter's, so those take peft's forward, except under autocast."""
    name = _plain_adapter(self)
    ok = name is not None and (x.dtype == self.lora_A[name].weight.dtype or torch.is_autocast_enabled(x.device.type))
    return name if ok else None


def _fused_args(self, name: str, x: torch.Tensor) -> tuple | None:
    base = self.base_layer
    transposed = _frozen_base(base)
    if transposed is None:
        return None
    weight_in_out = base.weight if transposed else base.weight.t()  # a view either way, no copy
    return (weight_in_out, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
            compute_dtype(x))


def _fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs else _runnable_adapter(self, x)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    fused = _fused_args(self, name, x)
    if fused is not None:
        out = _LoraLinear.apply(x, *fused)
        # Shaped like x out here, by autograd: a view made inside the function could not be changed in place
        # (Falcon adds to its MLP's output, for one), and a copy would cost a pass over it.
        return out.view(*x.shape[:-1], out.shape[-1])
    # A trained or another kind of base layer: autograd, with the update folded into the B matmul.
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    result = base(x)
    h = F.linear(x, a)
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                        alpha=self.scaling[name])
    return fused.view(result.shape)


def linear_forward(x2, weight_in_out, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype):
    """The forward arithmetic of :class:`_LoraLinear` on a 2-d input: returns the output and what the backward
    needs besides the input (the rank-r ``x @ A.T`` and the weights in ``dtype``)."""
    x2 = x2.to(dtype)
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    h = x2 @ a.t()
    w = weight_in_out.to(dtype)
    out = gemm.linear(x2, w.t(), bias.to(dtype) if bias is not None else None, frozen=True)
    out.addmm_(h, b.t(), alpha=scaling)
    return out, (h, w, a, b)


def linear_backward(grad2, x2, h, w, a, b, scaling: float, needs: tuple[bool, bool, bool],
                    param_dtypes: tuple[torch.dtype, torch.dtype]):
    """The backward arithmetic of :class:`_LoraLinear` on 2-d tensors: gradients at the input (in the compute
    dtype), A and B (in ``param_dtypes``, the adapter's), each None unless ``needs`` (input, A, B) asks for it."""
    g = grad2.to(x2.dtype)
    gh = (g @ b).mul_(scaling)  # gradient at x @ A.T, [tokens, r]
    # B's gradient as the transpose of h.T @ g: MKL runs that layout ~1.5x faster than g.T @ h on CPUs (the
    # rank-r products' share of an fp32 Llama step 8.1% -> 7.4%, BENCHMARKS.md); the same products, summed in
    # another order.
    grad_b = (h.t() @ g).t().mul_(scaling).to(param_dtypes[1]) if needs[2] else None
    grad_a = (gh.t() @ x2).to(param_dtypes[0]) if needs[1] else None
    grad_x = gemm.linear(g, w, frozen=True).addmm_(gh, a) if needs[0] else None
    return grad_x, grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    """``x @ W_io + bias + scaling * (x @ A.T) @ B.T`` for a frozen ``W_io`` (and bias), computed in ``dtype``;
    the output is 2-d (``tokens x out``).

    ``W_io`` is the weight as an ``[in, out]`` matrix: ``nn.Linear``'s weight transposed (a view), GPT-2's
    ``Conv1D`` weight as it is stored, so neither is copied. One autograd node instead of a dozen, and the
    input gradient accumulated in place: ``g @ W_io.T`` is written once and the LoRA term ``(g @ B) @ A`` is
    added into it by the same GEMM (``addmm_``), where autograd would write two full-size gradients and add
    them. Saves ``x`` and the rank-r ``x @ A.T``, as autograd does; or, where ``x`` is a norm's output that
    says how to rebuild it (:mod:`.rebuild`), what rebuilds it.
    """

    @staticmethod
    def forward(ctx, x, weight_in_out, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        out, kept = linear_forward(x2, weight_in_out, bias, lora_a, lora_b, scaling, dtype)
        ctx.recipe = rebuild.recipe(x)  # a norm's output: keep what rebuilds it rather than the output itself
        ctx.save_for_backward(*(ctx.recipe.take() if ctx.recipe else (x2,)), *kept)
        ctx.scaling, ctx.x_dtype, ctx.dtype = scaling, x.dtype, dtype
        ctx.param_dtypes, ctx.x_shape = (lora_a.dtype, lora_b.dtype), x.shape
        return out  # 2-d: the caller shapes it like x

    @staticmethod
    def backward(ctx, grad):
        *inputs, h, w, a, b = ctx.saved_tensors
        if ctx.recipe:
            x2 = ctx.recipe.value(tuple(inputs))
            x2 = x2.reshape(-1, x2.shape[-1]).to(ctx.dtype)
        else:
            (x2,) = inputs
        needs = ctx.needs_input_grad
        grad_x, grad_a, grad_b = linear_backward(grad, x2, h, w, a, b, ctx.scaling, (needs[0], needs[3], needs[4]),
                                                 ctx.param_dtypes)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def keep_activations_in_compute_dtype(model) -> None:
    """Stop peft from casting every LoRA input to the adapter's fp32 dtype.

    Under autocast the adapter matmuls run in bf16/fp16 anyway, so the cast only costs two full-size copies of
    each adapted layer's input (to fp32 and back) in the forward pass and again in the backward pass.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
