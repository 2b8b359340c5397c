"""Fast LoRA inference on a shared base: a lean forward for uniform batches, and in-place merging while a base
serves a single version.

Adapters stay unmerged (several versions share one base), so every adapted linear layer computes
``x W^T + b + s (x A^T) B^T``. PEFT's ``lora.Linear.forward`` does that through five module calls and checks
per layer and per step; at batch sizes where decoding is bound by per-operation overhead (a small model, one
request) that costs more than the arithmetic. Here the same sum is two GEMMs and one fused multiply-add
(``addmm``) on the layer's own tensors: no copies, nothing merged, the base weights untouched.

The engine names the adapter of a uniform batch in :class:`ActiveAdapter` (``None``: the base alone). Anything
else goes to PEFT's own forward: a mixed batch (``adapter_names``), a layer without that adapter, DoRA and other
variants, Conv1D-style (``fan_in_fan_out``) or non-``nn.Linear`` base layers.

While a base serves one version only (the usual case), even the two small GEMMs are avoidable: the adapter is
merged into the base weights in place (:func:`merge_in_place`, PEFT's own merge, the arithmetic of
``finetune.load``) and the LoRA layers hand their input straight to their base layers
(:func:`route_to_base_layers`), so decoding costs what a merged model costs, with no second copy of anything.
When a second version (or the base itself) is wanted, :func:`restore_base_weights` puts the base weights back
exactly, read again from the base's safetensors files (subtracting the delta again would leave rounding errors
in the base that every other version would then inherit); merging is only done where that restore is possible.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The attributes the original bound forward and the lean one are kept under on each patched layer.
_ORIGINAL = "_finetune_peft_forward"
_LEAN = "_finetune_lean_forward"


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
            lean = types.MethodType(_make_forward(active), module)
            setattr(module, _LEAN, lean)
            module.forward = lean
            patched += 1
    return patched


def route_to_base_layers(model: nn.Module, merged: bool) -> int:
    """While an adapter is merged in place (``merged=True``), each patched layer calls its base layer's forward
    directly: exactly what the merged weights compute, without the LoRA layer's own Python, which cost 3-7%
    of a decoding step of a small model (BENCHMARKS.md). ``merged=False`` puts the lean forward back. Returns
    how many layers were switched."""
    switched = 0
    for module in model.modules():
        lean = vars(module).get(_LEAN)
        if lean is not None:
            module.forward = module.base_layer.forward if merged else lean
            switched += 1
    return switched


def _make_forward(active: ActiveAdapter):
    def forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        if (not active.enabled or args or kwargs or self.fan_in_fan_out or type(base) is not nn.Linear
                or (self.merged and self.disable_adapters)):
            return getattr(self, _ORIGINAL)(x, *args, **kwargs)
        # merged: the base weights hold the (one) adapter already
        name = None if self.disable_adapters or self.merged else active.name
        if name is not None and (name not in self.lora_A or name in self.lora_variant):
            return getattr(self, _ORIGINAL)(x, *args, **kwargs)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # F.linear, not ``x2 @ weight.t()``: for one decoding row it was as fast or faster, up to 22% (BENCHMARKS.md)
        out = F.linear(x2, base.weight, base.bias)
        if name is not None:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            scale = self.scaling[name]
            if a.dtype == out.dtype:
                out = torch.addmm(out, x2 @ a.t(), b.t(), alpha=scale)
            else:  # fp32 adapters on a bf16/fp16 base: the adapter's arithmetic in its own dtype, as PEFT does
                out = out + ((x2.to(a.dtype) @ a.t()) @ b.t() * scale).to(out.dtype)
        return out.view(*shape[:-1], out.shape[-1])

    return forward


# ------------------------------------------------------------------ merging in place while one version is served
def _lora_layers(peft_model: nn.Module) -> list[tuple[str, Any]]:
    """``(checkpoint key of the base weight, layer)`` for every LoRA linear layer of a PeftModel."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    inner = peft_model.get_base_model()
    return [(f"{path}.weight", module) for path, module in inner.named_modules() if isinstance(module, LoraLinear)]


def _checkpoint_files(folder: str) -> dict[str, Path] | None:
    """Which safetensors file of a local model folder holds each tensor; None when that cannot be told."""
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return {key: root / name for key, name in weight_map.items()}
    single = root / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {key: single for key in f.keys()}
    return None


def can_restore(peft_model: nn.Module, folder: str) -> bool:
    """Whether every LoRA layer's base weight can be read back from the base's files (a local folder)."""
    files = _checkpoint_files(folder) if Path(folder).is_dir() else None
    if not files:
        return False
    layers = _lora_layers(peft_model)
    return bool(layers) and all(key in files and type(layer.base_layer) is nn.Linear and not layer.fan_in_fan_out
                                for key, layer in layers)


def merge_in_place(peft_model: nn.Module, name: str) -> None:
    """Merge adapter ``name`` into the base weights (PEFT's merge: the arithmetic ``finetune.load`` uses)."""
    peft_model.base_model.merge_adapter([name])


def restore_base_weights(peft_model: nn.Module, folder: str) -> int:
    """Put the base weights of merged layers back exactly, from the files; returns how many were restored.

    Each restored weight is checked against ``merged - delta`` (a wrong tensor would differ by far more than
    rounding); on a mismatch :class:`RuntimeError` is raised before anything else changes.
    """
    from safetensors import safe_open

    files = _checkpoint_files(folder) or {}
    layers = [(key, layer) for key, layer in _lora_layers(peft_model) if layer.merged]
    originals = []
    by_file: dict[Path, list[tuple[str, Any]]] = {}
    for key, layer in layers:
        by_file.setdefault(files[key], []).append((key, layer))
    with torch.no_grad():
        for path, entries in by_file.items():
            with safe_open(str(path), "pt") as f:
                for key, layer in entries:
                    weight = layer.base_layer.weight
                    original = f.get_tensor(key).to(device=weight.device, dtype=weight.dtype)
                    delta = sum(layer.get_delta_weight(n) for n in layer.merged_adapters)
                    scale = weight.detach().abs().max().item() + 1e-6
                    if original.shape != weight.shape or (weight - delta - original).abs().max().item() > 1e-2 * scale:
                        raise RuntimeError(f"the base weight {key} in {path.name} does not match the loaded model")
                    originals.append((layer, original))
        for layer, original in originals:
            layer.base_layer.weight.copy_(original)
            layer.merged_adapters = []
    return len(originals)
