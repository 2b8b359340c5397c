"""Training progress as events: one hub that every follower of a training subscribes to.

Events are notifications, never the only copy: a training's record, ``metrics.jsonl`` and log on disk stay the
truth, and a follower re-reads them when told that something changed. The hub knows each training's latest
state (its status, its step, a sequence number that grows with every event), so a late subscriber starts from
it and never misses the final status.

Who publishes: a training in a worker process of this server's :class:`~finetune.queue.LocalExecutor` reports
each change through its supervisor (:mod:`finetune.supervisor`): status changes, each step's metrics, log lines,
and its exit; the queue's own record changes (queued, settled after a death, canceled) are published by the
service. For trainings no local worker reports on (a Ray cluster's, a ``finetune train`` in another process),
one :class:`FileWatcher` looks at the files of the trainings somebody follows and publishes what changed: one
poller for every follower, instead of one each.

Followers: the webhooks (:class:`finetune.server.webhooks.TrainingWebhooks`, a callback), the web app's live
training page (waits for the next change, asynchronously), anything else through :meth:`TrainingEvents.subscribe`
(a bounded iterator).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry.jobs import FINAL, Trainings
from ..serving.signals import Signal

log = logging.getLogger("finetune.queue")

WATCH_EVERY_S = 0.5  # how often the file watcher looks at followed trainings no local worker reports on
FORGET_AFTER_S = 60.0  # the watcher forgets a training's files this long after its last follower left
KEEP_ENDED = 10_000  # ended trainings whose final state the hub keeps for late followers (the oldest go first)


@dataclass(frozen=True)
class TrainingEvent:
    """One change of a training: ``kind`` is ``status`` (``data["status"]``), ``metrics`` (``data["row"]``, when
    known), ``log`` (``data["line"]``, when known) or ``exit`` (its worker process ended: ``code``, ``how``)."""

    seq: int
    training_id: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.kind == "status" and self.data.get("status") in FINAL


@dataclass
class _State:
    seq: int = 0
    status: str | None = None
    step: int | None = None
    fed: int = 0  # local workers reporting on it now: the file watcher leaves it alone


class Subscription:
    """Events of one training (or of all: ``training_id`` None) as they come, at most ``maxlen`` kept: a follower
    too slow for them loses the oldest (``missed`` counts them; the files have everything)."""

    def __init__(self, hub: TrainingEvents, training_id: str | None, maxlen: int,
                 callback: Callable[[TrainingEvent], None] | None = None):
        self.hub, self.training_id, self.callback = hub, training_id, callback
        self._events: deque[TrainingEvent] = deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self.missed = 0
        self.closed = False
        self.ended = False

    def _put(self, event: TrainingEvent) -> None:
        if self.callback is not None:
            try:
                self.callback(event)
            except Exception:  # a follower's bug must not stop the training's other followers
                log.exception("training events: a follower failed on %s", event)
            return
        with self._cond:
            if self.closed or self.ended:
                return
            if len(self._events) == self._events.maxlen:
                self.missed += 1
            self._events.append(event)
            self.ended = event.final and self.training_id is not None  # nothing comes after a final status
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> TrainingEvent | None:
        """The next event, waiting up to ``timeout`` seconds; None when none came, or none will (the training's
        final status was taken, or the subscription closed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._events or self.closed or self.ended, timeout)
            return self._events.popleft() if self._events else None

    def __iter__(self) -> Iterator[TrainingEvent]:
        """The events until the training's final status (included) or :meth:`close`."""
        while (event := self.get()) is not None:
            yield event

    def close(self) -> None:
        self.hub._drop(self)
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainingEvents:
    """The hub: :meth:`publish` a training's change; :meth:`subscribe`, :meth:`listen` or :meth:`wait` for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}
        self._subs: list[Subscription] = []
        self._waiters: dict[str, list[Signal]] = {}  # training id -> the open waits for its next event
        self._ended: deque[str] = deque()  # trainings whose final status came, oldest first (see KEEP_ENDED)

    # ---------------------------------------------------------------- publishing
    def publish(self, training_id: str, kind: str, data: dict[str, Any] | None = None) -> TrainingEvent:
        """Record one change and hand it to the followers (on this thread: they return quickly)."""
        data = dict(data or {})
        with self._lock:
            state = self._states.setdefault(training_id, _State())
            state.seq += 1
            if kind == "status" and data.get("status"):
                state.status = str(data["status"])
            elif kind == "metrics" and isinstance(data.get("row"), dict) and "step" in data["row"]:
                state.step = data["row"]["step"]
            event = TrainingEvent(state.seq, training_id, kind, data)
            if event.final:
                self._forget_oldest_ended(training_id)
            subs = [s for s in self._subs if s.training_id in (None, training_id)]
            waiters = list(self._waiters.get(training_id, ()))
        for waiter in waiters:
            waiter.set()
        for sub in subs:
            sub._put(event)
        return event

    def _forget_oldest_ended(self, training_id: str) -> None:
        # A long-running server hears of every training it ever ran: past KEEP_ENDED, the oldest ended ones
        # are forgotten (a follower of one then reads its files, which hold everything, as for an unknown one).
        self._ended.append(training_id)
        while len(self._ended) > KEEP_ENDED:
            old = self._ended.popleft()
            state = self._states.get(old)
            if state is not None and state.status in FINAL and not state.fed and not self._waiters.get(old):
                del self._states[old]

    def feeding(self, training_id: str, on: bool) -> None:
        """Whether a local worker reports on ``training_id`` (then the file watcher leaves it alone)."""
        with self._lock:
            state = self._states.setdefault(training_id, _State())
            state.fed = max(0, state.fed + (1 if on else -1))

    # ---------------------------------------------------------------- following
    def latest(self, training_id: str) -> TrainingEvent | None:
        """The training's latest known state as a ``status`` event (its ``seq`` is the newest), or None."""
        with self._lock:
            state = self._states.get(training_id)
            if state is None or state.status is None:
                return None
            return TrainingEvent(state.seq, training_id, "status", {"status": state.status, "step": state.step})

    def seq(self, training_id: str) -> int:
        """How many events the training had (0: none yet); a change shows as a larger number."""
        with self._lock:
            state = self._states.get(training_id)
            return state.seq if state is not None else 0

    def subscribe(self, training_id: str | None = None, maxlen: int = 256) -> Subscription:
        """A bounded iterator of the training's events (all trainings': None), starting with its latest state."""
        sub = Subscription(self, training_id, maxlen)
        with self._lock:
            self._subs.append(sub)
        latest = self.latest(training_id) if training_id is not None else None
        if latest is not None:
            sub._put(latest)  # a late subscriber sees where it is, the final status included
        return sub

    def listen(self, callback: Callable[[TrainingEvent], None], training_id: str | None = None) -> Subscription:
        """Call ``callback(event)`` for each event (of ``training_id``, or of all trainings), on the publisher's
        thread: it must return quickly. :meth:`Subscription.close` ends it."""
        sub = Subscription(self, training_id, 1, callback)
        with self._lock:
            self._subs.append(sub)
        return sub

    def wait(self, training_id: str, since: int, timeout: float) -> int:
        """Wait until the training has an event newer than ``since`` (or ``timeout``); its newest ``seq``."""
        waiter = self._waiter(training_id, since)
        try:
            if waiter is not None:
                waiter.wait(timeout)
        finally:
            self._drop_waiter(training_id, waiter)
        return self.seq(training_id)

    async def wait_async(self, training_id: str, since: int, timeout: float) -> int:
        """:meth:`wait` for an event loop: holds no thread while it waits."""
        waiter = self._waiter(training_id, since)
        try:
            if waiter is not None:
                await waiter.wait_async(timeout)
        finally:
            self._drop_waiter(training_id, waiter)
        return self.seq(training_id)

    def _waiter(self, training_id: str, since: int) -> Signal | None:
        """A signal set by the training's next event; None when there is one after ``since`` already (or when
        ``since`` is from before this hub: a restarted server numbers afresh)."""
        with self._lock:
            if self._seq(training_id) != since:
                return None
            waiter = Signal()
            self._waiters.setdefault(training_id, []).append(waiter)
            return waiter

    def _drop_waiter(self, training_id: str, waiter: Signal | None) -> None:
        with self._lock:
            waiters = self._waiters.get(training_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(training_id, None)

    def followed(self) -> set[str]:
        """The trainings somebody follows that no local worker reports on: the file watcher's to look at."""
        with self._lock:
            ids = {s.training_id for s in self._subs if s.training_id is not None} | set(self._waiters)
            return {i for i in ids if not (i in self._states and self._states[i].fed)}

    def _seq(self, training_id: str) -> int:
        state = self._states.get(training_id)
        return state.seq if state is not None else 0

    def _drop(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)


@dataclass
class _Seen:
    status: str | None = None
    stamps: tuple[tuple[int, int], ...] = ((-1, -1),) * 3  # (mtime, size) of the record, metrics.jsonl, the log
    followed_at: float = 0.0


class FileWatcher:
    """The one poller: for each followed training no local worker reports on (a cluster's, another process's),
    look at its record, metrics and log every :data:`WATCH_EVERY_S` and publish what changed."""

    def __init__(self, hub: TrainingEvents, trainings: Trainings, every_s: float = WATCH_EVERY_S):
        self.hub, self.trainings, self.every_s = hub, trainings, every_s
        self._seen: dict[str, _Seen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-events-watch", daemon=True)

    def start(self) -> FileWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.look()

    def look(self) -> None:
        """Publish the changes of every followed training since the last look."""
        followed, now = self.hub.followed(), time.monotonic()
        for training_id, seen in list(self._seen.items()):
            # Kept a while after its last follower: a page's next wait comes a moment after the last one ended,
            # and what changed in between is still seen as a change.
            if training_id not in followed and now - seen.followed_at > FORGET_AFTER_S:
                del self._seen[training_id]
        for training_id in followed:
            self._seen.setdefault(training_id, _Seen()).followed_at = now
            try:
                self._look_at(training_id)
            except Exception:  # one unreadable record must not keep the others' followers waiting
                log.exception("training events: looking at %s failed", training_id)

    def _look_at(self, training_id: str) -> None:
        paths = self.trainings.paths(training_id)
        stamps = tuple(_stamp(p) for p in (paths.record, paths.metrics, paths.log))
        seen = self._seen.setdefault(training_id, _Seen())
        if stamps == seen.stamps:
            return
        before, seen.stamps = seen.stamps, stamps
        if stamps[0] != before[0] or seen.status is None:
            status = self.trainings.get(training_id).status
            status = str(getattr(status, "value", status))
            known = self.hub.latest(training_id)  # at the first look: what the followers know already
            previous = seen.status if seen.status is not None else known.data["status"] if known else None
            seen.status = status
            if status != previous:
                self.hub.publish(training_id, "status", {"status": status})
        if stamps[1][1] > before[1][1] >= 0:
            self.hub.publish(training_id, "metrics", {})
        if stamps[2][1] > before[2][1] >= 0:
            self.hub.publish(training_id, "log", {})


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)
