"""What runs on a node for ``--predict-executor ray``: :class:`InferenceActor`, the local worker's core
(:class:`~finetune.serving.worker.WorkerCore`) in a Ray actor; the server's side is
:class:`finetune.cluster.inference.RayInferencePool`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from ..serving.worker import CoreCalls, WorkerConfig

# Decoding makes a piece every few ms: each answer waits this long after its first event for the next ones, so
# the server reads them a batch per round trip (not one call per token, whose cost the engine's CPU would share).
GATHER_S = 0.01


class InferenceActor(CoreCalls):
    """One inference worker on a node (see :mod:`finetune.cluster.inference`). Methods are called by the server:
    ``submit``, ``cancel`` and ``compare`` go to the core as they are (:class:`~finetune.serving.worker.CoreCalls`),
    and its events wait in a list until :meth:`events` reads them."""

    def __init__(self, config: WorkerConfig, name: str):
        import socket

        import ray

        from ..serving.worker import WorkerCore
        from ..training.runlog import quiet_libraries

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        quiet_libraries()
        self.name = name
        self.where = {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
        self._events: list[tuple[int, tuple[str, str, dict[str, Any]]]] = []
        self._seq = 0
        self._cond = threading.Condition()
        self.core = WorkerCore(config, self._send)

    def _send(self, job_id: str, kind: str, payload: dict[str, Any]) -> None:
        with self._cond:
            self._seq += 1
            self._events.append((self._seq, (job_id, kind, payload)))
            self._cond.notify_all()

    # ---------------------------------------------------------------- the server's calls
    def info(self) -> dict[str, Any]:
        return {**self.where, "pid": os.getpid(), "name": self.name}

    def stats(self) -> dict[str, Any]:
        return {**self.core.stats(), **self.info(), "loaded": self.core.loaded()}

    def events(self, after: int, timeout_s: float) -> dict[str, Any]:
        """The events after number ``after`` (those up to it were read: forgotten), waiting up to ``timeout_s``
        for one; with the refs of the versions loaded now when any prediction was admitted or ended."""
        with self._cond:
            self._events = [e for e in self._events if e[0] > after]
            waited = not self._events
            if waited:
                self._cond.wait(timeout_s)
        if waited and self._events:  # the first of a stream: a few ms more gather the pieces that follow it
            time.sleep(GATHER_S)
        with self._cond:
            batch = list(self._events)
        loaded = self.core.loaded() if any(e[1][1] in ("admitted", "done") for e in batch) else None
        return {"seq": batch[-1][0] if batch else after, "events": [e[1] for e in batch], "loaded": loaded}
