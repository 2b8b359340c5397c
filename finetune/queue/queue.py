"""The training queue: submitted trainings run at most ``executor.capacity`` at once, taking turns between
accounts (first in, first out within one account).

The queue holds no state of its own that matters: a training's record (status ``starting`` until its worker
loads it) is the truth, so a queue started on a registry re-queues every record that was waiting or interrupted
(oldest first) and watches the runs a previous server's queue started that outlived it. What the queue adds:

- pick-up: a submitted training goes to a free slot at once (the dispatcher is woken, not polled);
- turns: the next training is the oldest waiting one of the account whose last turn is the longest ago, so an
  account with many queued trainings cannot keep another's waiting behind all of them;
- cancel: a queued training ends ``canceled`` without running; a running one gets the cancel marker and SIGTERM
  and stops at its next step (``run_training`` settles it ``canceled``), nothing published;
- a time limit (``max_run_s``): a run past it is stopped and ends ``failed``, saying the limit and its flag;
- a worker that dies without settling its record (SIGKILL, out of memory) leaves it ``failed`` with the reason;
  one that died after publishing is settled ``succeeded`` (never published twice);
- stop (server shutdown): running trainings are stopped and put back in the queue, so the next start continues
  them (from their newest checkpoint).

Only runs of a queue are the queue's: a training run by ``finetune train`` (CLI or Python), even one that
continues an API training, is never adopted, stopped or re-queued by a server (its record's ``runner`` tells).
A run is known by its pid and start mark (:mod:`finetune.processes`), never by a pid alone.

The queue writes a record only while no worker runs it, so it never races a worker's own writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import ConflictError
from ..registry import Registry
from ..registry.jobs import FINAL, QUEUED_SOURCES, TrainingRecord, Trainings
from .executor import Executor, Job, describe_exit
from .recovery import recover

log = logging.getLogger("finetune.queue")

# A listener hears ("queued" | "started" | "ended", training_id); it must return quickly (webhooks queue work).
Listener = Callable[[str, str], None]

_TICK_S = 0.1  # how often running jobs are checked for an exit
_KILL_AFTER_S = 15.0  # a run stopped for its time limit gets this long to end at a step before SIGKILL


def destination_owner(record: TrainingRecord) -> str:
    """The account a training belongs to: its destination's owner."""
    return record.destination.split("/", 1)[0]


def format_duration(seconds: float) -> str:
    """``86400`` -> ``24h``, ``5400`` -> ``90m``, ``42`` -> ``42s``."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class TrainingQueue:
    """Trainings over training records, run by an :class:`~finetune.queue.executor.Executor`, accounts in turn."""

    def __init__(self, registry: Registry, executor: Executor, *, listener: Listener | None = None,
                 resubmit_sources: tuple[str, ...] = QUEUED_SOURCES,
                 owner_of: Callable[[TrainingRecord], str] = destination_owner,
                 max_run_s: float | None = None):
        self.registry = registry
        self.trainings = Trainings(registry)
        self.executor = executor
        self.listener = listener
        self.resubmit_sources = resubmit_sources  # a CLI run that died is the user's to --resume, not ours
        self.owner_of = owner_of
        self.max_run_s = max_run_s  # None: no limit on a run's time
        self._pending: list[str] = []  # oldest first; taken in turns (see _order)
        self._owner: dict[str, str] = {}  # training id -> account, for the pending and running ones
        self._last_turn: dict[str, int] = {}  # account -> when it last had a training started
        self._turns = 0
        self._running: dict[str, Job] = {}
        self._began: dict[str, float] = {}  # training id -> time.monotonic() its run began
        self._adopted: set[str] = set()  # runs a previous server's queue started
        self._overtime: dict[str, float] = {}  # training id -> when it was stopped for its time limit
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

    def stop(self, grace_s: float = 15.0, *, abort: bool = False) -> None:
        """Stop dispatching; stop running trainings (SIGTERM, then SIGKILL after ``grace_s``) and leave them
        queued for the next start. Queued trainings stay queued (their records say ``starting``).

        With ``abort`` (the server failed to start), the runs adopted from a previous server are left as they
        are: a failed start never touches work it did not start."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            # A job that outlives the server (a cluster's) goes on; the next server re-attaches to it. A failed
            # start (abort) leaves the runs it adopted alone.
            jobs = {i: j for i, j in self._running.items()
                    if not (abort and i in self._adopted) and not getattr(j, "outlives_server", False)}
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
        owner = self.owner_of(self.trainings.get(training_id))
        with self._lock:
            if training_id in self._pending or training_id in self._running:
                return
            self._pending.append(training_id)
            self._owner[training_id] = owner
            self._lock.notify_all()
        self._emit("queued", training_id)

    def count(self, owner: str) -> int:
        """How many trainings of ``owner`` are queued or running here."""
        with self._lock:
            return sum(1 for i in (*self._pending, *self._running) if self._owner.get(i) == owner)

    def cancel(self, training_id: str) -> TrainingRecord:
        """Cancel a queued or running training (ours, or a CLI run's). Raises ConflictError if it ended."""
        with self._lock:
            if training_id in self._pending:
                self._pending.remove(training_id)
                self._owner.pop(training_id, None)
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
        """0-based place in the waiting line (in the order the turns will start them), or None when not waiting."""
        with self._lock:
            try:
                return self._order().index(training_id)
            except ValueError:
                return None

    def running(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def pending(self) -> list[str]:
        """The waiting trainings, in the order they will start (if no other arrives meanwhile)."""
        with self._lock:
            return self._order()

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

    # ---------------------------------------------------------------- turns
    def _order(self) -> list[str]:
        """The pending trainings in the order they start: each time, the oldest one of the account whose last
        turn is the longest ago (one that never had a turn first). Called under the lock."""
        last = dict(self._last_turn)
        waiting: dict[str, list[str]] = {}
        for training_id in self._pending:
            waiting.setdefault(self._owner.get(training_id, ""), []).append(training_id)
        arrival = {owner: self._pending.index(ids[0]) for owner, ids in waiting.items()}
        order: list[str] = []
        turn = self._turns
        while waiting:
            owner = min(waiting, key=lambda o: (last.get(o, -1), arrival[o]))
            order.append(waiting[owner].pop(0))
            last[owner] = turn
            turn += 1
            if waiting[owner]:
                arrival[owner] = self._pending.index(waiting[owner][0])
            else:
                del waiting[owner]
        return order

    def _take_next(self) -> str:
        """Remove and return the training whose turn it is. Called under the lock, with trainings pending."""
        training_id = self._order()[0]
        self._pending.remove(training_id)
        self._last_turn[self._owner.get(training_id, "")] = self._turns
        self._turns += 1
        return training_id

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
                        self._forget(training_id)
                        ended.append(training_id)
                self._enforce_time_limit()
                if ended:
                    self._refill()
                while self._pending and len(self._running) < self.executor.capacity:
                    training_id = self._take_next()
                    if self._start(training_id):
                        started.append(training_id)
                    else:
                        self._owner.pop(training_id, None)
                if ended:
                    self._lock.notify_all()
                if not ended and not started:
                    self._lock.wait(_TICK_S)
            for training_id in ended:
                self._emit("ended", training_id)
            for training_id in started:
                self._emit("started", training_id)

    def _forget(self, training_id: str) -> None:
        for table in (self._owner, self._began, self._overtime):
            table.pop(training_id, None)
        self._canceling.discard(training_id)
        self._adopted.discard(training_id)

    def _enforce_time_limit(self) -> None:
        """Stop the runs past ``max_run_s`` (marker and SIGTERM: they end at their next step); kill those that
        did not end within :data:`_KILL_AFTER_S` of that. Called under the lock."""
        if self.max_run_s is None:
            return
        now = time.monotonic()
        for training_id, job in self._running.items():
            stopped = self._overtime.get(training_id)
            if stopped is None and now - self._began.get(training_id, now) > self.max_run_s:
                log.warning("training %s ran past the time limit (%s): stopping it", training_id,
                            format_duration(self.max_run_s))
                self._overtime[training_id] = now
                self.trainings.paths(training_id).cancel.touch()
                job.stop()
            elif stopped is not None and now - stopped > _KILL_AFTER_S:
                job.kill()

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
        self._began[training_id] = time.monotonic()
        return True

    def _settle(self, training_id: str, job: Job, requeue: bool) -> None:
        """The job ended: make sure its record says how (its worker normally did)."""
        try:
            record = self.trainings.get(training_id)
        except Exception:
            return
        if record.status == "succeeded":
            return
        overtime = training_id in self._overtime
        if record.status in FINAL and not requeue and not overtime:
            return
        published = self.registry.published_by(record.destination, training_id)
        if published is not None:  # it published, then died before saying so: settle, never republish
            self.trainings.update(record, status="succeeded", error=None,
                                  output={"version": published.ref, "weights": str(published.path)})
        elif overtime:
            assert self.max_run_s is not None
            self.trainings.update(record, status="failed",
                                  error=f"the training ran longer than this server's limit of "
                                        f"{format_duration(self.max_run_s)} (--max-training-time) and was "
                                        f"stopped; nothing was published")
        elif requeue:  # server shutdown: run it again (from its newest checkpoint) after the next start
            self.trainings.update(record, status="starting", pid=None, pid_mark=None, runner=None, error=None,
                                  completed_at=None)
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
        """Take back what a previous server left (see :func:`~finetune.queue.recovery.recover`)."""
        found = recover(self.trainings, self.executor, self.resubmit_sources)
        for run in found.running:
            self._running[run.record.id] = run.job
            self._owner[run.record.id] = self.owner_of(run.record)
            self._began[run.record.id] = run.began
            if run.adopted:
                self._adopted.add(run.record.id)
        for record in found.pending:
            self._pending.append(record.id)
            self._owner[record.id] = self.owner_of(record)

    def _emit(self, event: str, training_id: str) -> None:
        if self.listener is None:
            return
        try:
            self.listener(event, training_id)
        except Exception:  # a listener's bug must not stop the queue
            log.exception("queue listener failed on %s %s", event, training_id)
