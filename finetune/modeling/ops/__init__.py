"""Exact rewrites of a model's training arithmetic: fewer passes over activations, fewer copies kept.

Each rewrite computes what peft and transformers compute (tests compare logits and gradients with the
unrewritten model, for every architecture the benchmark uses) and applies only where it recognises the module;
anything else keeps its own code, and :func:`rewrite_for_training` says which paths are on, so a fallback is
visible in the training log. ``lora`` (fused LoRA linear), ``norms`` (RMSNorm), ``mlp`` (gated MLP, tanh GELU),
``attention`` (packed causal attention), ``rotary`` (RoPE in one function), ``loss`` (output layer fused with
the cross-entropy), ``loss_rows`` (the last MLP only where the loss looks), ``rebuild`` (norm outputs rebuilt in
the backward pass by the layers that read them, rather than kept); ``gemm`` picks the library for the fp32 CPU
products those paths own.
"""

from __future__ import annotations

import dis
import inspect
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def same_code(function: Any, reference: Any) -> bool:
    """Whether ``function`` is ``reference``'s code (a copy in another model family counts), by its bytecode.

    Decorated functions are compared by what they wrap: transformers wraps many ``forward`` methods in the same
    generic decorators (argument deprecations, gradient checkpointing), whose code is alike for every model.
    Docstrings do not count: copies in other families often reword them."""
    function, reference = inspect.unwrap(function), inspect.unwrap(reference)
    code, ref = getattr(function, "__code__", None), reference.__code__
    return (code is not None and code.co_code == ref.co_code and code.co_names == ref.co_names
            and _constants(function) == _constants(reference))


def _constants(function: Any) -> tuple:
    """The code's constants but the docstring's slot: CPython up to 3.13 keeps a function's docstring first among
    them, or None there when it has none. The slot is left out only when the code never loads it."""
    code = function.__code__
    consts, doc = code.co_consts, function.__doc__
    slot = consts[:1] == (doc,) if doc is not None else consts[:1] == (None,)
    loads_slot = any(ins.opname in ("LOAD_CONST", "RETURN_CONST") and ins.arg == 0
                     for ins in dis.get_instructions(code))
    return consts[1:] if slot and not loads_slot else consts


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout) without gradients, for a check at setup; every module's own mode
    is restored after (``model.train()`` would set them all alike)."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@dataclass(frozen=True)
class FusedPaths:
    """Which rewritten paths a model trains through, and what kept its own code (class names)."""

    lora: Counter  # path name (see ops.lora.lora_path) -> adapted layers taking it
    rms_norms: int
    other_norms: tuple[str, ...]
    gated_mlps: int
    other_mlps: tuple[str, ...]
    tanh_gelus: int
    loss: str
    last_mlp_loss_rows: bool
    attention: str
    rotary: int
    other_attention: tuple[str, ...]
    gemm: str  # which library runs the fp32 CPU products of the rewritten paths
    gated_mlps_off: bool = False  # gated MLPs the rewrite recognises, left to their own code by choice (fp32, CPU)
    changed: tuple[str, ...] = ()  # transformers functions whose code is not what the rewrites were checked against

    def __str__(self) -> str:
        total = sum(self.lora.values())
        lora = f"lora {self.lora['fused']}/{total} layers"
        if total != self.lora["fused"]:
            lora += " (" + ", ".join(f"{n} {k}" for k, n in sorted(self.lora.items()) if k != "fused") + ")"
        norms = f"rmsnorm {self.rms_norms}"
        mlps = "gated-mlp off in fp32 on CPUs" if self.gated_mlps_off else f"gated-mlp {self.gated_mlps}"
        if self.other_norms:
            norms += f" ({', '.join(self.other_norms)} unchanged)"
        if self.other_mlps:
            mlps += f" ({', '.join(self.other_mlps)} unchanged)"
        if self.tanh_gelus:
            mlps += f", tanh-gelu {self.tanh_gelus}"
        last = "loss rows" if self.last_mlp_loss_rows else "all rows"
        rope = f"rope {self.rotary}"
        if self.other_attention:
            rope += f" ({', '.join(self.other_attention)} unchanged)"
        text = (f"fused paths: {lora}, {norms}, {mlps}, loss {self.loss}, last mlp on {last}, "
                f"attention {self.attention}, {rope}, fp32 matmuls {self.gemm}")
        if self.changed:
            text += (f"; off where transformers' code is not the code they were checked against: "
                     f"{', '.join(self.changed)}")
        return text


def rewrite_for_training(model, precision: str, device: torch.device) -> FusedPaths:
    """Apply every rewrite that recognises its module to a (PEFT) model about to train; say what is on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..precision import torch_dtype
    from .attention import attention_path
    from .checked import changed
    from .gemm import choose_fp32_cpu_linear, use_onednn
    from .lora import fuse_lora_updates, keep_activations_in_compute_dtype, lora_path
    from .loss import logits_path
    from .loss_rows import last_mlp_on_loss_rows
    from .mlp import fuse_gated_mlps, fuse_tanh_gelus, gated_mlps
    from .norms import fuse_rms_norms
    from .rotary import fuse_rotary

    if precision != "fp32":
        keep_activations_in_compute_dtype(model)
    if precision == "fp32" and device.type == "cpu":
        gemm = choose_fp32_cpu_linear()
    else:
        use_onednn(False)
        gemm = "torch"
    fuse_lora_updates(model)
    rms = fuse_rms_norms(model)
    # The gated-MLP rewrite recomputes two activations in the backward pass rather than keep them. In fp32 on a
    # CPU that costs 1-2% of a step to save 4-9% of the peak (BENCHMARKS.md, 2026-12-03), so the model's own
    # MLP runs there; in bf16 the two run alike, and GPUs are shorter of memory.
    mlps_off = precision == "fp32" and device.type == "cpu" and bool(gated_mlps(model))
    mlps = 0 if precision == "fp32" and device.type == "cpu" else fuse_gated_mlps(model)
    gelus = fuse_tanh_gelus(model)
    last_mlp = last_mlp_on_loss_rows(model)
    rotary = fuse_rotary(model)
    lora = Counter(lora_path(m) for m in model.modules() if isinstance(m, BaseTunerLayer))
    autocast = None if precision == "fp32" else torch_dtype(precision)  # as training runs the model
    inner = base_of(model)
    head = inner.get_output_embeddings()
    return FusedPaths(
        lora=lora,
        rms_norms=rms,
        other_norms=_unchanged(model, ("Norm",)),
        gated_mlps=mlps,
        other_mlps=_unchanged(model, ("MLP",)),
        tanh_gelus=gelus,
        loss=_loss_description(logits_path(model, autocast), inner, head),
        last_mlp_loss_rows=last_mlp,
        attention=attention_path(inner.config, device, torch_dtype(precision)),
        rotary=rotary,
        other_attention=_unchanged(model, ("Attention",)),
        gemm=gemm,
        gated_mlps_off=mlps_off,
        changed=changed(references()),
    )


def references() -> list:
    """Every transformers function a rewrite recognises modules by (see :mod:`.checked`)."""
    from . import loss_rows, mlp, norms, rotary

    return norms.references() + mlp.references() + rotary.references() + loss_rows.references()


def _loss_description(path: str, inner, head) -> str:
    if path == "model":
        return f"through {type(inner).__name__}.forward (its logits are more than its output layer's)"
    if path != "fused":
        return f"autograd ({type(head).__name__} head)"
    from .loss import softmax_rows

    rows, band = softmax_rows(head.weight.shape[0], head.weight.device)
    return "fused" if band == rows else f"fused (softmax {band} rows at a time)"


def _unchanged(model, suffixes: tuple[str, ...]) -> tuple[str, ...]:
    """Class names (with counts) of modules named like ``suffixes`` whose forward was not rewritten."""
    names = Counter(type(m).__name__ for m in model.modules()
                    if type(m).__name__.endswith(suffixes) and "forward" not in vars(m))
    return tuple(f"{n} {name}" for name, n in sorted(names.items()))
