"""The training queue: submitted trainings run first in, first out, at most ``executor.capacity`` at once.

The queue holds no state of its own that matters: a training's record (status ``starting`` until its worker
loads it) is the truth, so a queue started on a registry re-queues every record that was waiting or interrupted
(oldest first) and watches the runs that outlived the previous server. What the queue adds:

- pick-up: a submitted training goes to a free slot at once (the dispatcher is woken, not polled);
- cancel: a queued training ends ``canceled`` without running; a running one gets the cancel marker and SIGTERM
  and stops at its next step (``run_training`` settles it ``canceled``), nothing published;
- a worker that dies without settling its record (SIGKILL, out of memory) leaves it ``failed`` with the reason;
  one that died after publishing is settled ``succeeded`` (never published twice);
- stop (server shutdown): running trainings are stopped and put back in the queue, so the next start continues
  them (from their newest checkpoint).

The queue writes a record only while no worker runs it, so it never races a worker's own writes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable

from ..errors import ConflictError
from ..registry import Registry, process_alive
from ..registry.jobs import FINAL, TrainingRecord, Trainings
from .executor import Executor, Job, describe_exit

log = logging.getLogger("finetune.queue")

# A listener hears ("queued" | "started" | "ended", training_id); it must return quickly (webhooks queue work).
Listener = Callable[[str, str], None]

_TICK_S = 0.1  # how often running jobs are checked for an exit


class _AdoptedJob:
    """A run that outlived the previous server (its process is not our child): watched through its pid."""

    def __init__(self, training_id: str, pid: int):
        self.training_id, self.pid = training_id, pid

    def poll(self) -> int | None:
        return None if process_alive(self.pid) else 0

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


class TrainingQueue:
    """FIFO over training records, run by an :class:`~finetune.queue.executor.Executor`."""

    def __init__(self, registry: Registry, executor: Executor, *, listener: Listener | None = None,
                 resubmit_sources: tuple[str, ...] = ("api", "web")):
        self.registry = registry
        self.trainings = Trainings(registry)
        self.executor = executor
        self.listener = listener
        self.resubmit_sources = resubmit_sources  # a CLI run that died is the user's to --resume, not ours
        self._pending: deque[str] = deque()
        self._running: dict[str, Job] = {}
        self._canceling: set[str] = set()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> TrainingQueue:
        """Recover the registry's waiting and interrupted trainings, then start dispatching."""
        self._recover()
        self._thread = threading.Thread(target=self._dispatch_loop, name="training-queue", daemon=True)
        self._thread.start()
        return self

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop dispatching; stop running trainings (SIGTERM, then SIGKILL after ``grace_s``) and leave them
        queued for the next start. Queued trainings stay queued (their records say ``starting``)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            # A job that outlives the server (a cluster's) goes on; the next server re-attaches to it.
            jobs = {i: j for i, j in self._running.items() if not getattr(j, "outlives_server", False)}
        if self._thread is not None:
            self._thread.join()
        for job in jobs.values():
            job.stop()
        deadline = time.monotonic() + grace_s
        for training_id, job in jobs.items():
            while job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if job.poll() is None:
                job.kill()
                while job.poll() is None and time.monotonic() < deadline + 5:
                    time.sleep(0.05)
            self._settle(training_id, job, requeue=training_id not in self._canceling)
        with self._lock:
            self._running.clear()
        self.executor.close()

    # ---------------------------------------------------------------- API
    def submit(self, training_id: str) -> None:
        """Queue a record written by ``submit_training`` (status ``starting``)."""
        with self._lock:
            if training_id in self._pending or training_id in self._running:
                return
            self._pending.append(training_id)
            self._lock.notify_all()
        self._emit("queued", training_id)

    def cancel(self, training_id: str) -> TrainingRecord:
        """Cancel a queued or running training (ours, or a CLI run's). Raises ConflictError if it ended."""
        with self._lock:
            if training_id in self._pending:
                self._pending.remove(training_id)
                record = self.trainings.get(training_id)
                if record.status not in FINAL:
                    self.trainings.update(record, status="canceled", error="canceled before it started")
                ended = True
            else:
                ended = False
                job = self._running.get(training_id)
                if job is not None:
                    record = self.trainings.get(training_id)
                    if record.status in FINAL:
                        raise ConflictError(f"training {training_id} already {record.status}")
                    self._canceling.add(training_id)
                    self.trainings.paths(training_id).cancel.touch()  # the run checks it at every step
                    job.stop()  # before its worker installed a handler this ends it; after, it stops at a step
                    return self.trainings.get(training_id)
        if ended:
            self._emit("ended", training_id)
            return self.trainings.get(training_id)
        return self.trainings.request_cancel(training_id)  # not ours: a CLI run, or a record nobody runs

    def position(self, training_id: str) -> int | None:
        """0-based place in the waiting line, or None when not waiting."""
        with self._lock:
            try:
                return list(self._pending).index(training_id)
            except ValueError:
                return None

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def pending(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running (tests, benchmarks). True if it got there in time."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, _TICK_S))
        return True

    # ---------------------------------------------------------------- dispatching
    def _dispatch_loop(self) -> None:
        while True:
            ended: list[str] = []
            started: list[str] = []
            with self._lock:
                if self._stopping:
                    return
                for training_id, job in list(self._running.items()):
                    if job.poll() is not None:
                        del self._running[training_id]
                        self._settle(training_id, job, requeue=False)
                        self._canceling.discard(training_id)
                        ended.append(training_id)
                if ended:
                    self._refill()
                while self._pending and len(self._running) < self.executor.capacity:
                    training_id = self._pending.popleft()
                    if self._start(training_id):
                        started.append(training_id)
                if ended:
                    self._lock.notify_all()
                if not ended and not started:
                    self._lock.wait(_TICK_S)
            for training_id in ended:
                self._emit("ended", training_id)
            for training_id in started:
                self._emit("started", training_id)

    def _refill(self) -> None:
        refill = getattr(self.executor, "refill", None)
        if refill is not None:
            refill()

    def _start(self, training_id: str) -> bool:
        try:
            record = self.trainings.get(training_id)
        except Exception as err:  # deleted meanwhile, unreadable: nothing to run
            log.warning("training %s not started: %s", training_id, err)
            return False
        if record.status != "starting":
            return False  # canceled from the CLI, or run by someone else meanwhile
        if self.trainings.cancel_requested(training_id):
            self.trainings.update(record, status="canceled", error="canceled before it started")
            return False
        try:
            self._running[training_id] = self.executor.start(training_id)
        except Exception as err:
            self.trainings.update(record, status="failed", error=f"could not start a worker: {err}")
            return False
        return True

    def _settle(self, training_id: str, job: Job, requeue: bool) -> None:
        """The job ended: make sure its record says how (its worker normally did)."""
        try:
            record = self.trainings.get(training_id)
        except Exception:
            return
        if record.status == "succeeded" or (record.status in FINAL and not requeue):
            return
        published = self.registry.published_by(record.destination, training_id)
        if published is not None:  # it published, then died before saying so: settle, never republish
            self.trainings.update(record, status="succeeded", error=None,
                                  output={"version": published.ref, "weights": str(published.path)})
        elif requeue:  # server shutdown: run it again (from its newest checkpoint) after the next start
            self.trainings.update(record, status="starting", pid=None, error=None, completed_at=None)
        elif training_id in self._canceling:
            self.trainings.update(record, status="canceled", error="canceled")
        else:
            code = job.poll()
            how = describe_exit(code) if code is not None else "ended"
            self.trainings.update(record, status="failed",
                                  error=f"the worker process {how} before the training finished; nothing was "
                                        f"published")

    # ---------------------------------------------------------------- recovery
    def _recover(self) -> None:
        """Queue waiting records and watch runs that outlived the previous server, oldest first."""
        records = sorted(self.trainings.list(), key=lambda r: (r.created_at, r.id))
        adopt = getattr(self.executor, "adopt", None)  # an executor whose runs outlive the server finds its own
        for record in records:
            if record.status in FINAL:
                continue
            job = adopt(record) if adopt is not None else None
            if job is not None:
                self._running[record.id] = job
            elif record.pid and process_alive(record.pid):
                self._running[record.id] = _AdoptedJob(record.id, record.pid)
            elif record.source in self.resubmit_sources:
                if record.status != "starting":  # interrupted mid-run (server and worker both gone)
                    self.trainings.update(record, status="starting", pid=None)
                self._pending.append(record.id)

    def _emit(self, event: str, training_id: str) -> None:
        if self.listener is None:
            return
        try:
            self.listener(event, training_id)
        except Exception:  # a listener's bug must not stop the queue
            log.exception("queue listener failed on %s %s", event, training_id)


