"""A lean inference forward for PEFT's LoRA linear layers, for batches that use one adapter.

Adapters stay unmerged (several versions share one base), so every adapted linear layer computes
``x W^T + b + s (x A^T) B^T``. PEFT's ``lora.Linear.forward`` does that through five module calls and checks
per layer and per step; at batch sizes where decoding is bound by per-operation overhead (a small model, one
request) that costs more than the arithmetic. Here the same sum is two GEMMs and one fused multiply-add
(``addmm``) on the layer's own tensors: no copies, nothing merged, the base weights untouched.

The engine names the adapter of a uniform batch in :class:`ActiveAdapter` (``None``: the base alone). Anything
else goes to PEFT's own forward: a mixed batch (``adapter_names``), a layer without that adapter, DoRA and other
variants, Conv1D-style (``fan_in_fan_out``) or non-``nn.Linear`` base layers.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

# The attribute the original bound forward is kept under on each patched layer.
_ORIGINAL = "_finetune_peft_forward"


class ActiveAdapter:
    """Which adapter the lean forward applies (shared by every layer of one base model)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.enabled = True  # False: every layer runs PEFT's own forward (for comparisons)


def install(model: nn.Module, active: ActiveAdapter) -> int:
    """Route the forward of every PEFT LoRA linear layer of ``model`` through :func:`_forward`; returns how many
    layers it patched (layers patched already are left as they are)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    patched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not hasattr(module, _ORIGINAL):
            setattr(module, _ORIGINAL, module.forward)
            module.forward = types.MethodType(_make_forward(active), module)
            patched += 1
    return patched


def _make_forward(active: ActiveAdapter):
    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        if (not active.enabled or args or kwargs or self.merged or self.fan_in_fan_out
                or type(base) is not nn.Linear):
            return getattr(self, _ORIGINAL)(x, *args, **kwargs)
        name = None if self.disable_adapters else active.name
        if name is not None and (name not in self.lora_A or name in self.lora_variant):
            return getattr(self, _ORIGINAL)(x, *args, **kwargs)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        weight, bias = base.weight, base.bias
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        if name is not None:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            scale = self.scaling[name]
            if a.dtype == out.dtype:
                out = torch.addmm(out, x2 @ a.t(), b.t(), alpha=scale)
            else:  # fp32 adapters on a bf16/fp16 base: the adapter's arithmetic in its own dtype, as PEFT does
                out = out + ((x2.to(a.dtype) @ a.t()) @ b.t() * scale).to(out.dtype)
        return out.view(*shape[:-1], out.shape[-1])

    return forward
