"""Webhooks: a training's object POSTed to its ``webhook`` URL as it starts, logs, outputs and completes.

As Replicate sends them: the body is the training object (as ``GET /v1/trainings/{id}`` returns it), the events
are ``start`` (the training was created), ``logs`` (its log grew; at most one a second), ``output`` (it has
an output) and ``completed`` (it ended: succeeded, failed or canceled); ``webhook_events_filter`` picks some of
them (default: all). Each request is signed the Standard Webhooks way, which Replicate's docs and SDKs verify::

    webhook-id:        msg_...            (the same for every retry of one message)
    webhook-timestamp: 1733050000         (seconds since the epoch)
    webhook-signature: v1,BASE64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))

where ``key`` is the base64-decoded part of the account's ``whsec_...`` secret
(``GET /v1/webhooks/default/secret``).

Trainings run in other processes: :class:`TrainingWebhooks` follows the trainings that have a webhook on the
server's training events (:mod:`finetune.queue.events`), looks at the record when one changed, and hands webhook
events to :class:`WebhookSender`, whose background threads (one lane per account) deliver them and retry failures
with exponential backoff. A slow or dead receiver delays only its own account's deliveries; it never blocks or
fails a training. Where a webhook may go is the business
of :mod:`.webhook_targets`: the API refuses bad URLs, and every attempt resolves and checks the address.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import http.client
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..queue.events import Subscription, TrainingEvent, TrainingEvents
from ..registry.jobs import FINAL, TrainingRecord, Trainings
from ..serving.inputs import WEBHOOK_EVENTS, check_events_filter
from .webhook_targets import WebhookPolicy, WebhookRefused, post

log = logging.getLogger("finetune.webhooks")

EVENTS = WEBHOOK_EVENTS
_LOGS_EVERY_S = 1.0  # Replicate throttles `logs` webhooks too; a log line per step would flood a receiver
_GATHER_S = 0.25  # a step's or a log line's event is looked at this much later, with those that follow it


def check_webhook(url: str | None, events: list[str] | None, policy: WebhookPolicy | None = None) -> None:
    """A 422-class error for a webhook URL the rules refuse (see :mod:`.webhook_targets`; ``policy``: the
    server's address rules, default: public addresses only) or an event filter naming unknown events."""
    if url is not None:
        (policy or WebhookPolicy()).check_literal(url)
    check_events_filter(events)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for ``body`` (Standard Webhooks, v1 = HMAC-SHA256)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """Whether ``headers`` carry a valid signature of ``body`` made with ``secret`` (what a receiver checks)."""
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id, timestamp = lower["webhook-id"], int(lower["webhook-timestamp"])
        signatures = lower["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    expected = sign(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in signatures)


# ---------------------------------------------------------------------------------------------- delivery
@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    secret: str = field(compare=False)
    msg_id: str = field(compare=False)
    attempt: int = field(default=0, compare=False)


class _Lane:
    """One account's delivery thread with its own schedule: its deliveries go out in order, one at a time, and
    a receiver that never answers holds up only this lane. The thread ends after ``LANE_IDLE_S`` idle."""

    def __init__(self, sender: WebhookSender, account: str):
        self.sender, self.account = sender, account
        self.heap: list[_Delivery] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"webhooks-{account[:32]}", daemon=True)

    def put(self, delivery: _Delivery) -> bool:
        """Queue ``delivery``; False (dropped) when the lane already holds ``max_queued`` deliveries."""
        with self.cond:
            if len(self.heap) >= self.sender.max_queued:
                return False
            heapq.heappush(self.heap, delivery)
            self.cond.notify()
            return True

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    if self.sender.stopped and (not self.heap or now > self.sender.drain_until):
                        self.sender.retire(self)
                        return
                    if self.heap and self.heap[0].due <= now:
                        delivery = heapq.heappop(self.heap)
                        break
                    if not self.heap and now - idle_since > self.sender.lane_idle_s and self.sender.retire(self):
                        return
                    wait = (self.heap[0].due - now) if self.heap else None
                    self.cond.wait(min(wait, 0.5) if wait is not None else 0.5)
            self.sender.attempt(self, delivery)
            idle_since = time.monotonic()


class WebhookSender:
    """Delivers signed POSTs in background threads, one lane per account, so that one account's slow or dead
    receiver never delays another account's webhooks. A failed delivery is retried ``attempts`` times in all,
    waiting ``backoff_s`` * 2^n between tries; each try takes at most ``timeout_s`` in all (connecting, sending
    and reading the answer). An account's deliveries keep their order; at most ``max_queued`` wait per account
    (more are dropped and logged). ``policy`` says which addresses webhooks may reach (see
    :mod:`.webhook_targets`)."""

    def __init__(self, attempts: int = 6, backoff_s: float = 1.0, timeout_s: float = 10.0,
                 policy: WebhookPolicy | None = None, max_queued: int = 1000, lane_idle_s: float = 60.0):
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self.policy = policy or WebhookPolicy()
        self.max_queued, self.lane_idle_s = max_queued, lane_idle_s
        self.started = False
        self.stopped = False
        self.drain_until = 0.0
        self._seq = 0
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {}
        self.delivered = 0  # counters, for tests and the server's log
        self.failed = 0
        self.refused = 0  # of those failed: refused by the address rules, nothing sent

    def start(self) -> None:
        with self._lock:
            self.started = True
            for lane in self._lanes.values():
                if not lane.thread.is_alive():
                    lane.thread.start()

    def stop(self, drain_s: float = 2.0) -> None:
        """Stop after sending what is due within ``drain_s`` (retries further out are dropped)."""
        self.drain_until = time.monotonic() + drain_s
        self.stopped = True
        with self._lock:
            lanes = list(self._lanes.values())
        for lane in lanes:
            with lane.cond:
                lane.cond.notify()
        for lane in lanes:
            if lane.thread.is_alive():
                lane.thread.join(timeout=drain_s + self.timeout_s)

    def retire(self, lane: _Lane) -> bool:
        """Forget an idle lane (called by its own thread with its lock held); False if work arrived."""
        with self._lock:
            if lane.heap and not self.stopped:
                return False
            if self._lanes.get(lane.account) is lane:
                del self._lanes[lane.account]
            return True

    def send(self, key: str, url: str, payload: dict[str, Any], secret: str, account: str = "") -> str:
        """Queue one message in ``account``'s lane; returns its ``webhook-id``. ``key`` (a training or
        prediction id) names it in the log."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        msg_id = "msg_" + os.urandom(12).hex()
        while True:
            with self._lock:
                self._seq += 1
                seq = self._seq
                lane = self._lanes.get(account)
                if lane is None:
                    lane = self._lanes[account] = _Lane(self, account)
                    if self.started:
                        lane.thread.start()
            with lane.cond:
                with self._lock:
                    retired = self._lanes.get(account) is not lane
                if retired:
                    continue  # the lane ended just now: queue in a new one
                if not lane.put(_Delivery(time.monotonic(), seq, url, body, secret, msg_id)):
                    self.failed += 1
                    log.warning("webhook %s for %s dropped: %d deliveries of this account are waiting already",
                                msg_id, key, self.max_queued)
                return msg_id

    def attempt(self, lane: _Lane, d: _Delivery) -> None:
        timestamp = int(time.time())
        headers = {  # lower-case names, as Replicate sends them (urllib would capitalise them)
            "content-type": "application/json",
            "user-agent": "finetune-webhooks",
            "webhook-id": d.msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(d.secret, d.msg_id, timestamp, d.body),
        }
        try:
            status = post(d.url, d.body, headers, self.timeout_s, self.policy)
            if 200 <= status < 300:
                self.delivered += 1
                return
            problem = f"HTTP {status}"
        except WebhookRefused as err:  # the same answer on every retry: give up at once
            self.failed += 1
            self.refused += 1
            log.warning("webhook %s not sent: %s", d.msg_id, err)
            return
        except (OSError, ValueError, http.client.HTTPException) as err:  # refused, timed out, unreachable
            problem = f"{type(err).__name__}: {err}"
        except Exception as err:  # noqa: BLE001 - whatever a receiver does, the lane goes on
            log.exception("webhook %s: unexpected failure", d.msg_id)
            problem = f"{type(err).__name__}: {err}"
        d.attempt += 1
        if d.attempt >= self.attempts or self.stopped:
            self.failed += 1
            log.warning("webhook %s to %s failed after %d attempts (%s)", d.msg_id, d.url[:200], d.attempt, problem)
            return
        d.due = time.monotonic() + self.backoff_s * 2 ** (d.attempt - 1)
        if not lane.put(d):
            self.failed += 1


# ---------------------------------------------------------------------------------------------- events
@dataclass
class _Watch:
    base_url: str
    sent_start: bool = False
    sent_output: bool = False
    log_size: int = 0
    last_logs: float = 0.0
    follow: Subscription | None = None


class TrainingWebhooks:
    """Turns a training's events (:class:`~finetune.queue.events.TrainingEvents`) into webhook events.

    Each event of a watched training makes one look at its record and log size (the truth), on this class's
    thread; nothing is looked at between events, except once more when a ``logs`` webhook was held back by the
    one-a-second limit. ``training_object(record, base_url)`` builds the payload; ``secret(owner)`` gives the
    account's signing secret; ``owner_of(record)`` names the account a training belongs to.
    """

    def __init__(self, trainings: Trainings, sender: WebhookSender,
                 training_object: Callable[[TrainingRecord, str], dict[str, Any]],
                 secret: Callable[[str], str], owner_of: Callable[[TrainingRecord], str], base_url: str,
                 events: TrainingEvents | None = None):
        self.trainings, self.sender = trainings, sender
        self.training_object, self.secret, self.owner_of = training_object, secret, owner_of
        self.base_url = base_url
        self.events = events if events is not None else TrainingEvents()
        self._watched: dict[str, _Watch] = {}
        self._due: list[tuple[float, str]] = []  # (when, training id): looks to take, soonest first
        self._scheduled: dict[str, float] = {}  # training id -> when its next look is due
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="webhook-watch", daemon=True)

    def start(self) -> None:
        """Resume following the registry's unfinished trainings that have a webhook, then start."""
        for record in self.trainings.unfinished():
            if _webhook(record):
                self._follow(record.id, _Watch(self.base_url, sent_start=True))
        self.sender.start()
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            ids = list(self._watched)
        for training_id in ids:  # a last look: events of trainings the queue just settled
            self._check_quietly(training_id)
        self.sender.stop()

    def watch(self, record: TrainingRecord, base_url: str | None = None) -> None:
        """Follow ``record`` (a new training): ``start`` is sent now, the rest as it happens."""
        if not _webhook(record):
            return
        self._follow(record.id, _Watch(base_url or self.base_url))
        self._check(record.id)

    def _follow(self, training_id: str, watch: _Watch) -> None:
        with self._lock:
            old = self._watched.get(training_id)
            self._watched[training_id] = watch
        if old is not None and old.follow is not None:
            old.follow.close()
        watch.follow = self.events.listen(self._heard, training_id)

    def _heard(self, event: TrainingEvent) -> None:
        # A status change is looked at now; steps and log lines a moment later, many to one look.
        soon = 0.0 if event.kind in ("status", "exit") else _GATHER_S
        self._look_soon(event.training_id, time.monotonic() + soon)

    def _look_soon(self, training_id: str, when: float) -> None:
        with self._lock:
            if self._scheduled.get(training_id, float("inf")) <= when:
                return  # a look that soon is due already
            self._scheduled[training_id] = when
            heapq.heappush(self._due, (when, training_id))
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._due and self._due[0][0] <= time.monotonic()):
                    self._lock.wait(self._due[0][0] - time.monotonic() if self._due else None)
                if self._stopping:
                    return
                due = set()
                while self._due and self._due[0][0] <= time.monotonic():
                    when, training_id = heapq.heappop(self._due)
                    if self._scheduled.get(training_id) == when:  # else an earlier look replaced this one
                        del self._scheduled[training_id]
                        due.add(training_id)
            for training_id in due:
                self._check_quietly(training_id)

    def _check_quietly(self, training_id: str) -> None:
        try:
            self._check(training_id)
        except Exception:  # one unreadable record must not stop the others' webhooks
            log.exception("webhooks: checking training %s failed", training_id)

    def _check(self, training_id: str) -> None:
        with self._lock:
            watch = self._watched.get(training_id)
        if watch is None:
            return
        record = self.trainings.get(training_id)
        url, wanted = _webhook(record), set(record_events(record))
        if not url:
            return
        events = []
        if not watch.sent_start:
            watch.sent_start = True
            events.append("start")
        now = time.monotonic()
        try:
            size = self.trainings.paths(training_id).log.stat().st_size
        except FileNotFoundError:
            size = 0
        final = record.status in FINAL
        if size > watch.log_size:
            if final or now - watch.last_logs >= _LOGS_EVERY_S:
                watch.log_size, watch.last_logs = size, now
                events.append("logs")
            else:  # held back by the limit: look again when it allows one
                self._look_soon(training_id, watch.last_logs + _LOGS_EVERY_S)
        if record.output and not watch.sent_output:
            watch.sent_output = True
            events.append("output")
        if final:
            events.append("completed")
            with self._lock:
                self._watched.pop(training_id, None)
            if watch.follow is not None:
                watch.follow.close()
        events = [e for e in events if e in wanted]
        if not events:
            return
        payload = self.training_object(record, watch.base_url)
        owner = self.owner_of(record)
        secret = self.secret(owner)
        for _ in events:  # one message per event, as Replicate sends them
            self.sender.send(training_id, url, payload, secret, account=owner)


def _webhook(record: TrainingRecord) -> str | None:
    return getattr(record, "webhook", None)


def record_events(record: TrainingRecord) -> list[str]:
    """The events a training's webhook wants (all four unless filtered)."""
    chosen = getattr(record, "webhook_events_filter", None)
    return list(chosen) if chosen else list(EVENTS)
