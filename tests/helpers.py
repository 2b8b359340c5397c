"""Helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import threading
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its type, mode and content hash: equal snapshots mean an unchanged tree.

    The registry's index (``cache/index``) is left out: derived data that any read may fill (registry.catalog)."""
    out: dict[str, tuple] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath).name == "cache":
            dirnames[:] = [d for d in dirnames if d != "index"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


def assert_one_line_error(rc: int | None, err: str, *needles: str) -> None:
    """The CLI failed (when ``rc`` is given) with exactly one ``finetune: error:`` line holding every needle."""
    if rc is not None:
        assert rc != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finetune: error: "), repr(err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


class FakeJob:
    """A training job of :class:`FakeExecutor`: runs until the test sets ``code`` (or stops or kills it)."""

    def __init__(self, training_id: str):
        self.training_id = training_id
        self.code: int | None = None
        self.stopped = False

    def poll(self) -> int | None:
        return self.code

    def stop(self) -> None:
        self.stopped = True
        self.code = -signal.SIGTERM

    def kill(self) -> None:
        self.code = -signal.SIGKILL


class FakeExecutor:
    """An executor (finetune.queue) that trains nothing: the queue's logic without worker processes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.jobs: dict[str, FakeJob] = {}
        self.order: list[str] = []
        self.started = threading.Event()
        self.closed = False

    def start(self, training_id: str) -> FakeJob:
        job = self.jobs[training_id] = FakeJob(training_id)
        self.order.append(training_id)
        self.started.set()
        return job

    def close(self) -> None:
        self.closed = True


def run_queued(registry, executor, training_id: str, timeout_s: float = 300) -> None:
    """Run one training through a real :class:`~finetune.queue.TrainingQueue` over ``executor`` until the queue
    is idle again (the queue is stopped either way)."""
    from finetune.queue import TrainingQueue

    queue = TrainingQueue(registry, executor).start()
    try:
        queue.submit(training_id)
        assert queue.wait_idle(timeout_s), f"training {training_id} still runs after {timeout_s} s"
    finally:
        queue.stop()
