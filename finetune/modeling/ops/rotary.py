"""Rotary position embeddings (RoPE) as one autograd function, in the attention layers that use transformers'
rotate-half RoPE (Llama, Qwen2, Mistral and the others that copy it), over all of each head's features or over
its first part only (partial rotary: Phi-3's and GPT-NeoX's functions, and the families that copy them).

transformers computes ``q * cos + rotate_half(q) * sin``, where ``rotate_half`` slices ``q`` in two halves,
negates one and concatenates them: six passes over ``q`` forward and as many backward (the slices' gradients are
zero-filled full-size tensors), for the queries and again for the keys of every layer. Written per half, it is
``q1 * cos1 - q2 * sin1`` and ``q2 * cos2 + q1 * sin2``: two multiply-adds into one output buffer, and the
backward pass is the same shape. Results equal transformers' up to rounding (each multiply-add rounds once where
transformers rounds the product and the sum). On a 2-core fp32 Llama step: 1.5-5% faster, and ~120 MB less
peak memory (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch

from . import same_code
from .checked import checked


class _Rotary(torch.autograd.Function):
    """RoPE of one tensor (queries or keys): ``x * cos + rotate_half(x) * sin`` over the first ``cos.shape[-1]``
    features of ``x`` (all of them but in partial rotary), the others passed through; ``cos`` and ``sin``
    broadcast to ``x``. The map is linear in ``x``, so only ``cos`` and ``sin`` are kept for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        # the dtype transformers' arithmetic gives: fp32 when bf16 queries meet fp32 cos/sin under autocast
        out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
        _rotate_part(x, cos, sin, out, sign=1)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad_x = torch.empty_like(grad)
        _rotate_part(grad, cos, sin, grad_x, sign=-1)  # the rotation's transpose: by -angle
        return grad_x.to(ctx.x_dtype), None, None


def _rotate_part(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: int) -> None:
    """:func:`_rotate` over the first ``cos.shape[-1]`` features, the others copied into ``out`` as they are."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        _rotate(x, cos, sin, out, sign)
        return
    _rotate(x[..., :rotary], cos, sin, out[..., :rotary], sign)
    out[..., rotary:].copy_(x[..., rotary:])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: int) -> None:
    """Into ``out``, per half. ``sign`` 1, the rotation: ``out1 = x1 cos1 - x2 sin1``, ``out2 = x2 cos2 + x1 sin2``
    (``x * cos + rotate_half(x) * sin``). ``sign`` -1, its transpose, for the gradient: ``out1 = x1 cos1 +
    x2 sin2``, ``out2 = x2 cos2 - x1 sin1``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos1, cos2 = cos[..., :half], cos[..., half:]
    sin1, sin2 = (sin[..., :half], sin[..., half:]) if sign > 0 else (sin[..., half:], sin[..., :half])
    torch.mul(x1, cos1, out=out[..., :half]).addcmul_(x2, sin1, value=-sign)
    torch.mul(x2, cos2, out=out[..., half:]).addcmul_(x1, sin2, value=sign)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb`` (same arguments, same results up to rounding) through
    :class:`_Rotary`; learned (trainable) ``cos``/``sin`` or odd sizes take transformers' function itself."""
    if cos.requires_grad or sin.requires_grad or q.shape[-1] % 2 or q.shape[-1] != cos.shape[-1]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as theirs

        return theirs(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)


def apply_partial_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' partial-rotary ``apply_rotary_pos_emb`` (Phi-3's, GPT-NeoX's: the first ``cos.shape[-1]``
    features of each head rotated, the rest passed through) through :class:`_Rotary`; learned ``cos``/``sin`` or
    odd sizes take Phi-3's function itself."""
    if cos.requires_grad or sin.requires_grad or cos.shape[-1] % 2 or cos.shape[-1] > q.shape[-1]:
        from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as theirs

        return theirs(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _Rotary.apply(q, cos, sin), _Rotary.apply(k, cos, sin)


def fuse_rotary(model) -> int:
    """Run the RoPE of every attention layer that applies transformers' rotate-half RoPE through
    :func:`apply_rotary_pos_emb` (or :func:`apply_partial_rotary_pos_emb`); returns how many layers.

    A layer qualifies when its class's ``forward`` calls a module-level ``apply_rotary_pos_emb`` whose code is
    Llama's, Phi-3's or GPT-NeoX's (and whose ``rotate_half`` is Llama's). Nothing global changes: the layer
    runs its class's own forward code, with that one name looked up in a copy of its module's namespace where
    it means ours.
    """
    count = 0
    for module in model.modules():
        if "forward" in vars(module) or _kernelized(module):  # already rewritten, or a hub kernel chosen for it
            continue
        forward = _with_our_rotary(type(module).forward)
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            count += 1
    return count


@functools.cache
def _with_our_rotary(forward: Callable) -> Callable | None:
    """``forward`` with its ``apply_rotary_pos_emb`` bound to ours; None if it does not call Llama's, or if it is
    wrapped in anything but transformers' argument-renaming decorator (whose old names then take ``forward``
    itself, so the renaming still happens) and the ``kernels`` package's hub-function routing (which only matters
    to the global function that ours replaces; :func:`fuse_rotary` leaves layers with a hub kernel chosen alone)."""
    from transformers.models.llama import modeling_llama as llama

    function, old_names = forward, set()
    while hasattr(function, "__wrapped__"):
        if not _routes_hub_functions(function):
            names = _renamed_argument(function)
            if names is None:
                return None
            old_names.add(names)
        function = function.__wrapped__
    code, namespace = getattr(function, "__code__", None), getattr(function, "__globals__", {})
    theirs = _plain_function(namespace.get("apply_rotary_pos_emb"))
    if code is None or "apply_rotary_pos_emb" not in code.co_names or not inspect.isfunction(theirs):
        return None
    theirs = inspect.unwrap(theirs)
    ours = next((ours for reference, ours in _references() if same_code(theirs, reference) and checked(reference)),
                None)
    if ours is None or not same_code(theirs.__globals__.get("rotate_half"), llama.rotate_half) \
            or not checked(llama.rotate_half):
        return None
    swapped = types.FunctionType(code, {**namespace, "apply_rotary_pos_emb": ours},
                                 function.__name__, function.__defaults__, function.__closure__)
    swapped.__kwdefaults__ = function.__kwdefaults__

    def run(self, *args: Any, **kwargs: Any):
        if old_names.intersection(kwargs):
            return forward(self, *args, **kwargs)
        return swapped(self, *args, **kwargs)

    return run


@functools.cache
def _references() -> tuple[tuple[Callable, Callable], ...]:
    """(transformers' function, ours) for each RoPE function recognised: full, then the two partial ones."""
    from transformers.models.gpt_neox import modeling_gpt_neox as neox
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.phi3 import modeling_phi3 as phi3

    return ((_plain_function(llama.apply_rotary_pos_emb), apply_rotary_pos_emb),
            (_plain_function(phi3.apply_rotary_pos_emb), apply_partial_rotary_pos_emb),
            (_plain_function(neox.apply_rotary_pos_emb), apply_partial_rotary_pos_emb))


def references() -> list:
    """The transformers functions this rewrite recognises layers by (see :mod:`.checked`)."""
    from transformers.models.llama import modeling_llama as llama

    return [reference for reference, _ in _references()] + [llama.rotate_half]


def _renamed_argument(wrapper: Callable) -> str | None:
    """The old argument name if ``wrapper`` is transformers' ``deprecate_kwarg`` wrapper, else None."""
    from transformers.utils.deprecation import deprecate_kwarg

    reference = deprecate_kwarg("old", "0.0.0", new_name="new")(lambda: None)
    code, ref = getattr(wrapper, "__code__", None), reference.__code__  # the wrapper's own code, not unwrapped
    if code is None or (code.co_code, code.co_names) != (ref.co_code, ref.co_names) or wrapper.__closure__ is None:
        return None
    old = _closure(wrapper).get("old_name")
    return old if isinstance(old, str) else None


# With the ``kernels`` package installed (transformers requires it from 5.25), transformers turns
# ``apply_rotary_pos_emb`` into a hub-function module whose default forward calls the plain function, and wraps
# the attention classes' ``forward`` in a router that sends the global module's calls to the layer's own copy,
# which ``kernels.kernelize`` may replace by a hub kernel. Both wrappers are recognised by their code, against
# references made with the package's own decorators, so any other change to them means no rewrite.

@functools.cache
def _hub_wrapper_codes() -> tuple[types.CodeType, types.CodeType] | None:
    """(the class router's code, the function module's forward code); None without ``kernels``."""
    try:
        from kernels import use_kernel_forward_from_hub, use_kernelized_func
    except ImportError:
        return None
    probe = use_kernel_forward_from_hub("finetune-probe")(lambda x: x)  # sets attributes of a new class only
    layer = use_kernelized_func(probe)(type("Probe", (torch.nn.Module,), {"forward": lambda self, x: x}))
    return layer.forward.__code__, type(probe).forward.__code__


def _routes_hub_functions(wrapper: Callable) -> bool:
    """Whether ``wrapper`` is the router ``kernels.use_kernelized_func`` puts around a class's ``forward``."""
    codes = _hub_wrapper_codes()
    return codes is not None and getattr(wrapper, "__code__", None) is codes[0]


def _plain_function(obj: Any) -> Any:
    """The function a hub-function module calls when no kernel is chosen for it; anything else as it is."""
    codes = _hub_wrapper_codes()
    forward = getattr(type(obj), "forward", None)
    if codes is None or getattr(forward, "__code__", None) is not codes[1] or "forward" in vars(obj):
        return obj
    return _closure(forward).get("func", obj)


def _kernelized(module: torch.nn.Module) -> bool:
    """Whether ``kernels.kernelize`` chose a hub kernel for one of this layer's own function copies."""
    copies = vars(module).get("_kernel_funcs") or {}
    return any("forward" in vars(copy) for copy in copies.values())


def _closure(function: Callable) -> dict[str, Any]:
    """The variables a nested function closes over, by name (what a decorator was given)."""
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in function.__closure__ or ())))
