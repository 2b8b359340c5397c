"""fp32 matrix products on x86 CPUs through oneDNN rather than PyTorch's default there, MKL.

PyTorch sends an fp32 ``mm`` on a CPU to MKL, and a bf16 one to oneDNN. On some CPUs oneDNN's fp32 kernels are
much the faster: on the development machine, an AMD EPYC with AVX-512, 190-210 GFLOP/s against MKL's 140-170
on the shapes a small decoder trains with, and a whole fp32 training step ~10% faster (BENCHMARKS.md). Only
the products that the rewritten training paths own take it: the frozen projections and the output layer,
forward and input gradient. Both libraries compute in fp32 with fp32 accumulation; results differ only in
summation order (~1e-6 relative).
"""

from __future__ import annotations

import functools
import os
import platform
import weakref

import torch
import torch.nn.functional as F

_onednn = False  # set by choose_fp32_cpu_linear; read by linear

# Frozen weights reordered into oneDNN's blocked layout, once, for as long as the weight lives: about 5% of an
# fp32 step on the development machine (BENCHMARKS.md), since oneDNN otherwise repacks the weight inside every
# product. Each is a second (and, for the input gradient's transposed use, a third) copy of the weight, so the
# copies are capped: past the budget, weights are used as they are.
_PACKED_ATTR = "_finetune_onednn_packed"  # on the weight: {(shape, strides, offset): ((version, address), packed)}
_packed_bytes = 0
_ROWS_HINT = 1024  # the product's row count oneDNN picks the packed layout for; any count works with it


@functools.cache
def _pack_budget() -> int:
    """Bytes of packed copies allowed: an eighth of the machine's memory (read once: it is asked per product
    once the budget is spent)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 8
    except (ValueError, OSError, AttributeError):
        return 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           frozen: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias`` (``weight`` as ``[out, in]``, a transposed view is fine), like ``F.linear``.

    2-d fp32 CPU tensors go to oneDNN once :func:`choose_fp32_cpu_linear` has chosen it. ``frozen``: the weight
    (or the tensor it is a view of) never changes, so a packed copy of it may be kept and reused."""
    if not (_onednn and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() and x.dim() == 2):
        return F.linear(x, weight, bias)
    if frozen:
        weight = _packed_copy(weight)
    return _onednn_linear(x, weight, bias, "none", [], "")


def _packed_copy(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed layout of ``weight`` as used now (plain or transposed), kept with the tensor it views;
    ``weight`` itself once the budget is spent."""
    global _packed_bytes
    owner = weight._base if weight._base is not None else weight
    layouts = getattr(owner, _PACKED_ATTR, None)
    if layouts is None:
        layouts = {}
        setattr(owner, _PACKED_ATTR, layouts)
    key = (tuple(weight.shape), weight.stride(), weight.storage_offset())
    cached = layouts.get(key)
    if cached is not None and cached[0] == (owner._version, owner.data_ptr()):
        return cached[1]
    size = weight.numel() * weight.element_size()
    if cached is None and _packed_bytes + size > _pack_budget():  # a re-pack replaces a copy already counted
        return weight
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _ROWS_HINT)
    if cached is None:
        _packed_bytes += size
        weakref.finalize(owner, _release, size)
    layouts[key] = ((owner._version, owner.data_ptr()), packed)
    return packed


def _onednn_linear(*args):
    return torch.ops.mkldnn._linear_pointwise(*args)


def _release(size: int) -> None:
    global _packed_bytes
    _packed_bytes -= size


def choose_fp32_cpu_linear() -> str:
    """Route :func:`linear` through oneDNN on x86-64 CPUs whose torch build has its linear operator; says which.

    A fixed rule, not a timing: a timed choice could differ between two runs (or two processes of one run) on
    the same machine, and with it the last bits of every result, so a resumed run would no longer reproduce
    the uninterrupted one. x86-64 because that is where it was measured (AMD, BENCHMARKS.md) and where Intel's
    own PyTorch extension sends fp32 linear layers to oneDNN too; elsewhere (Arm) torch keeps its own."""
    global _onednn
    _onednn = platform.machine().lower() in ("x86_64", "amd64") and onednn_available()
    return "onednn" if _onednn else "torch"


def use_onednn(enabled: bool) -> None:
    """Force the choice (tests, benchmarks); :func:`choose_fp32_cpu_linear` is what training calls."""
    global _onednn
    _onednn = bool(enabled) and onednn_available()


@functools.cache
def onednn_available() -> bool:
    """Whether this build has oneDNN's linear operator and it computes ``F.linear`` on a small fp32 case."""
    try:
        # fixed values, not torch.randn: a check must not move the global generator (dropout, seeds)
        x, w, b = (torch.arange(n, dtype=torch.float32).reshape(shape).sin()
                   for n, shape in ((35, (5, 7)), (21, (3, 7)), (3, (3,))))
        got = torch.ops.mkldnn._linear_pointwise(x, w.t().contiguous().t(), b, "none", [], "")
        return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
