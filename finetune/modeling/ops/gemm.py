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
import platform

import torch
import torch.nn.functional as F

_onednn = False  # set by choose_fp32_cpu_linear; read by linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (``weight`` as ``[out, in]``, a transposed view is fine), like ``F.linear``.

    2-d fp32 CPU tensors go to oneDNN once :func:`choose_fp32_cpu_linear` has chosen it."""
    if (_onednn and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() and x.dim() == 2):
        return _onednn_linear(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _onednn_linear(*args):
    return torch.ops.mkldnn._linear_pointwise(*args)


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
        x, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)
        got = torch.ops.mkldnn._linear_pointwise(x, w.t().contiguous().t(), b, "none", [], "")
        return bool(torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
