"""Where queued trainings run: the :class:`Executor` seam and the local one, worker processes on this machine.

An executor has a fixed number of slots (``capacity``) and turns a training id into a running :class:`Job`. The
queue decides what runs and when, and settles records whose job died; the job itself is an ordinary
``run_training(id)`` that writes its own record, log and version. A cluster executor (Ray, Slurm) would submit
the same call as a remote task and implement the same few methods.

:class:`LocalExecutor` gives each slot its own devices: with 4 GPUs and 4 slots one GPU each, with 4 GPUs and 1
slot all four, run through :mod:`finetune.launch` (accelerate's launcher, as the CLI uses it). A single-device
slot keeps one spare worker process started ahead of need (imports done, no device touched), so a training
starts loading in well under a second, also when it waited behind another. Each worker is a
:class:`finetune.supervisor.Child`: what its training reports (status, steps, log lines) and how it ended go to
the callback given to :meth:`LocalExecutor.report_to` (the server's training events, :mod:`finetune.queue.events`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import UsageError
from ..registry.jobs import RUNNER_ENV
from ..supervisor import Child, describe_exit

__all__ = ["Executor", "Job", "LocalExecutor", "describe_exit", "visible_gpus"]

# Hears (training id, event) for each event a worker reports (``{"kind": "status" | "metrics" | "log", ...}``,
# see finetune.queue.worker) and ``{"kind": "exit", "code": ..., "how": ...}`` once it ended.
OnJobEvent = Callable[[str, dict[str, Any]], None]


class Job(Protocol):
    """One training running somewhere."""

    training_id: str

    def poll(self) -> int | None:
        """None while it runs; its exit status once it ended (negative: killed by that signal)."""

    def stop(self) -> None:
        """Ask it to stop soon (the run ends ``canceled`` at its next step)."""

    def kill(self) -> None:
        """End it now."""

    # Optional: ``outlives_server = True`` on a job that goes on when the server stops (a cluster's): the queue's
    # stop then leaves it running, and the executor's ``adopt(record) -> Job | None`` finds it again at the next
    # start (see finetune.cluster.executor).


class Executor(Protocol):
    """Runs trainings: at most ``capacity`` at once."""

    @property
    def capacity(self) -> int:
        """How many trainings may run at once."""

    def start(self, training_id: str) -> Job:
        """Start ``run_training(training_id)``; called only while fewer than ``capacity`` jobs run."""

    def close(self) -> None:
        """Release idle resources (running jobs are the queue's to stop first)."""


def visible_gpus() -> list[str]:
    """The GPUs a child process may use, without importing torch (the server starts in well under 2 s)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


class _ProcessJob:
    """A training in a worker process of this machine (a :class:`~finetune.supervisor.Child`)."""

    def __init__(self, training_id: str, child: Child):
        self.training_id = training_id
        self.child = child

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def poll(self) -> int | None:
        return self.child.poll()

    def stop(self) -> None:
        self.child.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.child.signal(signal.SIGKILL)


class _Slot:
    def __init__(self, index: int, gpus: list[str]):
        self.index = index
        self.gpus = gpus
        self.spare: Child | None = None  # a worker with its imports done, waiting for an id
        self.job: _ProcessJob | None = None


class LocalExecutor:
    """Worker processes on this machine: ``workers`` slots (default: one per GPU, else one). GPUs are split
    evenly among the slots; with more slots than GPUs, slots share GPUs in turn."""

    def __init__(self, registry_root: str | os.PathLike[str], workers: int | None = None,
                 gpus: list[str] | None = None, prestart: bool = True):
        self.root = str(registry_root)
        gpus = visible_gpus() if gpus is None else gpus
        if workers is None:
            workers = max(1, len(gpus))
        if workers < 1:
            raise UsageError(f"--workers must be 1 or more, not {workers}")
        if len(gpus) >= workers:  # each slot its own GPUs (a leftover GPU stays unused rather than unequal)
            per = len(gpus) // workers
            self.slots = [_Slot(i, gpus[i * per:(i + 1) * per]) for i in range(workers)]
        else:  # more slots than GPUs: slots share them in turn (none on a CPU-only machine)
            self.slots = [_Slot(i, [gpus[i % len(gpus)]] if gpus else []) for i in range(workers)]
        self.capacity = workers
        self.prestart = prestart
        self._lock = threading.Lock()
        self._closed = False
        self._on_event: OnJobEvent | None = None
        if prestart:
            for slot in self.slots:
                self._prepare(slot)

    # ---------------------------------------------------------------- processes
    def _env(self, slot: _Slot) -> dict[str, str]:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)  # "" hides every GPU from a CPU slot
        if "OMP_NUM_THREADS" not in env:
            # Slots share the cores; without this each worker would start one thread per core.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.capacity))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env[RUNNER_ENV] = "queue"  # the record says a queue runs it: the next server may adopt it, and only such
        return env

    def report_to(self, on_event: OnJobEvent) -> None:
        """Send each event of the workers' trainings, and each worker's exit, to ``on_event`` (on the worker's
        reader thread: it must return quickly)."""
        self._on_event = on_event

    def _child(self, slot: _Slot, argv: list[str], **options: Any) -> Child:
        def event(message: dict[str, Any]) -> None:
            if child.work is not None and self._on_event is not None:  # a spare has no training yet
                self._on_event(child.work, message)

        def exited(code: int) -> None:
            if child.work is not None and self._on_event is not None:
                self._on_event(child.work, {"kind": "exit", "code": code, "how": describe_exit(code)})

        child = Child(argv, env=self._env(slot), on_event=event, on_exit=exited, name="train", **options)
        return child  # (named: the callbacks above read the training it was given)

    def _spawn_worker(self, slot: _Slot) -> Child:
        # A session of its own (Child): Ctrl-C in the server's terminal reaches the server, which stops its workers
        # in order (see TrainingQueue.stop), instead of every worker at once.
        return self._child(slot, [sys.executable, "-m", "finetune.queue.worker", "--registry", self.root]).start()

    def _prepare(self, slot: _Slot) -> None:
        if len(slot.gpus) <= 1 and (slot.spare is None or not slot.spare.alive()):
            slot.spare = self._spawn_worker(slot)

    def start(self, training_id: str) -> _ProcessJob:
        with self._lock:
            slot = next((s for s in self.slots if s.job is None or s.job.poll() is not None), None)
            if slot is None:
                raise RuntimeError("no free worker slot")  # the queue never asks beyond capacity
            if self._on_event is not None:  # from now on its worker reports on it (until its "exit")
                self._on_event(training_id, {"kind": "attached"})
            if len(slot.gpus) > 1:
                child = self._launch(slot, training_id)
            else:
                child = slot.spare if slot.spare is not None and slot.spare.alive() else self._spawn_worker(slot)
                slot.spare = None
                child.work = training_id
                # If it died while waiting, the job ends at once and the queue reports how.
                child.send({"op": "run", "training_id": training_id})
                child.close_input()
                if self.prestart and not self._closed:
                    # The next training in this slot starts warm too, even straight after this one.
                    self._prepare(slot)
            slot.job = _ProcessJob(training_id, child)
            return slot.job

    def _launch(self, slot: _Slot, training_id: str) -> Child:
        # The launched training processes inherit the event pipe (stdout); the main one reports on it.
        child = self._child(slot, [sys.executable, "-m", "finetune.launch", "--num-processes", str(len(slot.gpus)),
                                   "--registry", self.root, "--", "--resume", training_id, "--quiet"], stdin=False)
        child.work = training_id
        return child.start()

    def refill(self) -> None:
        """Forget ended jobs; start a spare worker where one is missing or died (called after a job ends)."""
        with self._lock:
            if self._closed or not self.prestart:
                return
            for slot in self.slots:
                if slot.job is not None and slot.job.poll() is not None:
                    slot.job = None
                self._prepare(slot)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares = [s.spare for s in self.slots if s.spare is not None]
            for slot in self.slots:
                slot.spare = None
        # A spare never got a training id (start() takes it under the lock), so ending it loses nothing; it may
        # still be importing torch for seconds, which a closed input would only stop once it reads.
        for child in spares:
            child.signal(signal.SIGTERM)
            child.close_input()
        for child in spares:
            if child.wait(2) is None:
                child.stop(0)
