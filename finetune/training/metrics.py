"""Measuring a run: throughput, and the per-step metrics file (``metrics.jsonl``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..supervisor import notify


class Throughput:
    """Tokens per second of training proper.

    Time spent in evaluation and checkpointing is excluded (``pause``/``resume``), so the figure describes the
    training step and can be compared with another trainer's. The first ``warmup_steps`` steps are also excluded:
    they include one-off costs (allocator growth, lazy initialisation) that say nothing about steady speed.
    """

    def __init__(self, warmup_steps: int = 0, clock=time.perf_counter):
        self._clock = clock
        self._warmup = warmup_steps
        self._steps = 0
        self._tokens = 0
        self._seconds = 0.0
        self._since: float | None = None
        # Unpaused time since the last step; credited (or, in warm-up, dropped) with the step that ends it, so
        # time before a pause inside a warm-up step is not counted either.
        self._pending = 0.0

    def start(self) -> None:
        self._since = self._clock()

    def pause(self) -> None:
        if self._since is not None:
            self._pending += self._clock() - self._since
            self._since = None

    resume = start

    def step(self, tokens: int) -> None:
        """Record one optimizer step that processed ``tokens`` real (non-padding) tokens."""
        if self._since is not None:
            now = self._clock()
            self._pending += now - self._since
            self._since = now
        elapsed, self._pending = self._pending, 0.0
        self._steps += 1
        if self._steps <= self._warmup:
            return
        self._tokens += tokens
        self._seconds += elapsed

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def seconds(self) -> float:
        return self._seconds

    def tokens_per_second(self) -> float:
        """Measured tokens over measured seconds; 0.0 before anything was measured."""
        return tokens_per_second(self._tokens, self._seconds)


def tokens_per_second(tokens: int, seconds: float) -> float:
    """The one definition of throughput: real tokens over wall seconds (0.0 when no time has passed)."""
    return tokens / seconds if seconds > 0 else 0.0


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far, in MiB: allocated accelerator memory on CUDA (what limits a GPU run),
    resident memory on the CPU (what limits a CPU run, and what the benchmark's peers are measured by)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only; not imported at module level so that Windows can still import this module

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step (step, loss, lr, tokens, ...)."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        notify("metrics", row=row)  # the parent's live views hear of it at once (the file stays the truth)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill -9: everything before it is still good
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run re-logs them)."""
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
