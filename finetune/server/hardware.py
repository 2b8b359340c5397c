"""What ``GET /v1/hardware`` lists: ``cpu`` and this machine's GPUs, found without importing torch.

The NVIDIA driver describes each GPU under ``/proc/driver/nvidia/gpus/*/information``; reading that costs
microseconds, where ``import torch`` costs seconds of server start. A model's ``hardware`` is stored as
``cpu``, ``gpu`` or ``auto`` (see :data:`finetune.registry.HARDWARE`); Replicate SKUs such as ``gpu-a100-large``
are accepted on input and stored as ``gpu``.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

_NVIDIA = Path("/proc/driver/nvidia/gpus")


@functools.lru_cache(maxsize=1)
def gpu_names() -> tuple[str, ...]:
    """The model name of each NVIDIA GPU the driver reports (empty without a driver)."""
    names = []
    try:
        entries = sorted(_NVIDIA.iterdir())
    except OSError:
        return ()
    for entry in entries:
        try:
            for line in (entry / "information").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    names.append(value.strip())
        except OSError:
            continue
    return tuple(names)


def hardware_list() -> list[dict[str, str]]:
    """``[{sku, name}]``: ``cpu`` always, ``gpu`` when this machine has GPUs (named with their count)."""
    out = [{"sku": "cpu", "name": "CPU"}]
    names = gpu_names()
    if names:
        label = ", ".join(f"{count}x {name}" for name, count in Counter(names).items())
        out.append({"sku": "gpu", "name": f"GPU ({label})"})
    return out


def normalize_hardware(sku: str | None) -> str:
    """A model's stored hardware for a requested SKU: ``cpu``, ``gpu`` (any ``gpu-*`` SKU) or ``auto``."""
    if not sku:
        return "auto"
    sku = sku.strip().lower()
    return "gpu" if sku.startswith("gpu-") else sku
