"""Reading safetensors files without torch: their tensors' names, and whether every float in them is finite.

The registry refuses to publish an adapter holding an infinite or NaN weight, whoever publishes it (a training,
an import, the HTTP API): such a version loads without complaint and answers garbage. The check reads each
file once through a memory map and tests the exponent bits of every float (all ones = inf or NaN), which works
the same for fp32, fp16, bf16 and fp64 without converting anything.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

# dtype -> (unsigned view, exponent mask): a float is inf or NaN exactly when all its exponent bits are set
_EXPONENT = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
}
_CHUNK = 1 << 24  # elements tested at a time: bounded temporary memory for large tensors


def non_finite_tensors(path: Path) -> list[str]:
    """Names of the tensors of a safetensors file that hold an infinite or NaN value (empty when all finite).

    Raises ``ValueError`` when the file is not a readable safetensors file.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as err:
            raise ValueError(f"{path} is not a safetensors file ({err})") from None
        size = path.stat().st_size
        if size <= 8 + length:
            return []  # no tensor data at all
        bad = []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            buffer = memoryview(data)[8 + length:]
            try:
                for name, info in header.items():
                    if name == "__metadata__" or info.get("dtype") not in _EXPONENT:
                        continue
                    view, mask = _EXPONENT[info["dtype"]]
                    start, end = info["data_offsets"]
                    values = np.frombuffer(buffer[start:end], dtype=view)
                    for i in range(0, values.size, _CHUNK):
                        if np.any((values[i:i + _CHUNK] & view(mask)) == view(mask)):
                            bad.append(name)
                            break
                    del values
            finally:
                buffer.release()
    return bad
