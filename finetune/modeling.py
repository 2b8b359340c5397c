"""Loading a base model for LoRA training or inference, and exact rewrites of its training arithmetic.

The frozen base weights are held in the compute dtype (bf16 where the device does it well) instead of fp32
master copies cast at every step; only the LoRA adapters (and their optimizer state) stay fp32. The rewrites
(``fuse_lora_updates``, ``fuse_rms_norms``, ``fuse_gated_mlps``, ``keep_activations_in_compute_dtype``)
compute what peft and transformers compute, with fewer passes over the activations and fewer copies kept for
the backward pass.
Packed attention lives in :mod:`finetune.attention`, the loss in :mod:`finetune.loss`.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import VARLEN_ATTENTION, register_varlen_attention
from .errors import ModelLoadError, one_line
from .sources import BaseSource

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_precision(requested: str, device: torch.device) -> str:
    """Resolve ``auto`` to what the device does well: bf16 on GPUs and CPUs with native bf16, else fp16/fp32."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise ModelLoadError("precision fp16 needs a GPU", "use precision: auto, bf16 or fp32 on the CPU")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and _cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def _cpu_has_native_bf16() -> bool:
    # oneDNN reports bf16 only with AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower than fp32.
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def torch_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's where it is on for ``x``'s device, else ``x``'s own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def load_tokenizer(source: BaseSource):
    """The base model's tokenizer, as is. Its pad token may even be eos: padding is masked by position (see
    :mod:`finetune.batching`), never by comparing token ids, so the eos a model must learn stays a label."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.load_path, revision=source.revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {source.description}: {one_line(err)}") from None
    return tok


def load_base_model(source: BaseSource, dtype: torch.dtype, attn_implementation: str | None = None):
    """The frozen base model, in ``dtype``, with the requested attention implementation."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "revision": source.revision}
    if attn_implementation == VARLEN_ATTENTION:
        register_varlen_attention()
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source.load_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load base model {source.description}: {one_line(err)}",
            "check that it exists (a registry ref, a local folder, or a hub id) and that the files are intact",
        ) from None
    model.requires_grad_(False)
    return model


def attach_lora(model, lora: Any, adapter_dir: str | None = None, trainable: bool = True):
    """Add a LoRA adapter: a fresh one from the ``lora`` config, or the one saved in ``adapter_dir``.

    Continuing from a fine-tune keeps training that adapter (no second adapter stacked on top).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    # peft keeps adapter weights in fp32 even when the base is bf16 (autocast_adapter_dtype), which is what we
    # want: low-precision frozen weights, full-precision trainable ones.
    return get_peft_model(model, cfg)


def fuse_lora_updates(model) -> int:
    """Route plain LoRA linears through a fused forward and backward; returns how many layers were routed.

    peft computes ``base(x) + lora_B(lora_A(x)) * scaling``: besides the two small matmuls, that is a full-size
    multiply and a full-size add per adapted layer, forward and backward. Here the update is accumulated into
    the base output by the B matmul itself (``addmm``), and with a frozen ``nn.Linear`` base the backward is
    written out too (see ``_LoraLinear``). Anything but the plain case (dropout, DoRA and other variants,
    several adapters, merged weights, extra arguments) keeps peft's own forward.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # the exact class: quantised and other subclasses keep their path
            module.forward = types.MethodType(_fused_lora_forward, module)
            count += 1
    return count


def _fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    plain = (
        not args and not kwargs and name is not None and not self.disable_adapters and not self.merged
        and name in self.lora_A and name not in self.lora_variant
        and isinstance(self.lora_dropout[name], nn.Identity) and self.lora_B[name].bias is None
        and (x.dtype == self.lora_A[name].weight.dtype or torch.is_autocast_enabled(x.device.type))
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    base, a, b = self.base_layer, self.lora_A[name].weight, self.lora_B[name].weight
    if (type(base) is nn.Linear and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)):
        return _LoraLinear.apply(x, base.weight, base.bias, a, b, self.scaling[name], compute_dtype(x))
    # A trained or non-Linear base layer (GPT-2's Conv1D): autograd, with the update folded into the B matmul.
    result = base(x)
    h = F.linear(x, a)
    fused = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.t(),
                        alpha=self.scaling[name])
    return fused.view(result.shape)


class _LoraLinear(torch.autograd.Function):
    """``x @ W.T + bias + scaling * (x @ A.T) @ B.T`` for a frozen ``W`` (and bias), computed in ``dtype``.

    One autograd node instead of a dozen, and the input gradient accumulated in place: ``g @ W`` is written
    once and the LoRA term ``(g @ B) @ A`` is added into it by the same GEMM (``addmm_``), where autograd would
    write two full-size gradients and add them. Saves ``x`` and the rank-r ``x @ A.T``, as autograd does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        h = x2 @ a.t()
        w = weight.to(dtype)
        out = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
        out.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, h, w, a, b)
        ctx.scaling, ctx.x_dtype = scaling, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, w, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
        gh = (g @ b).mul_(ctx.scaling)  # gradient at x @ A.T, [tokens, r]
        grad_b = (g.t() @ h).mul_(ctx.scaling).to(ctx.b_dtype) if ctx.needs_input_grad[4] else None
        grad_a = (gh.t() @ x2).to(ctx.a_dtype) if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w).addmm_(gh, a).view(*grad.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


class _RMSNorm(torch.autograd.Function):
    """Llama's RMSNorm (fp32 statistics, output cast back, then scaled), keeping only the input and one
    scalar per token for the backward pass instead of fp32 copies of the whole activation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = (grad * weight).float()
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad.float() * xhat.to(x.dtype).float()).sum(dim=tuple(range(grad.dim() - 1))).to(weight.dtype)
        return grad_x.to(x.dtype), grad_w, None


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model) -> int:
    """Give Llama-style RMSNorm modules a leaner backward; returns how many were changed.

    Only modules whose ``forward`` is byte for byte Llama's (Mistral, Qwen2/3, Phi-3 and others copy it) are
    changed; any other normalisation keeps its own code. Saves two fp32 copies of the hidden state per norm
    per token and a few elementwise passes.
    """
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    count = 0
    for module in model.modules():
        if _same_code(type(module).forward, LlamaRMSNorm.forward) and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            count += 1
    return count


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
        if (_same_code(type(module).forward, LlamaMLP.forward)
                and type(getattr(module, "act_fn", None)) in (SiLUActivation, nn.SiLU)):
            module.forward = types.MethodType(_gated_mlp_forward, module)
            count += 1
    return count


def _same_code(function: Any, reference: Any) -> bool:
    """Whether ``function`` is ``reference``'s code (a copy in another model family counts), by its bytecode."""
    code, ref = getattr(function, "__code__", None), reference.__code__
    return (code is not None and code.co_code == ref.co_code and code.co_consts == ref.co_consts
            and code.co_names == ref.co_names)


def keep_activations_in_compute_dtype(model) -> None:
    """Stop peft from casting every LoRA input to the adapter's fp32 dtype.

    Under autocast the adapter matmuls run in bf16/fp16 anyway, so the cast only costs two full-size copies of
    each adapted layer's input (to fp32 and back) in the forward pass and again in the backward pass.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
