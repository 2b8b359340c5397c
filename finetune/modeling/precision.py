"""Precision by capability: bf16 where the device does it natively, else fp16 (older GPUs) or fp32."""

from __future__ import annotations

import torch

from ..errors import ModelLoadError

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


