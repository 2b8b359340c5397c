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

Trainings run in other processes, so :class:`TrainingWebhooks` watches the records of trainings that have a
webhook (a cheap read every half second) and hands events to :class:`WebhookSender`, whose background threads
deliver them and retry failures with exponential backoff. A slow or dead receiver delays only its own
deliveries; it never blocks or fails a training.
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
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..registry.jobs import FINAL, TrainingRecord, Trainings

log = logging.getLogger("finetune.webhooks")

EVENTS = ("start", "output", "logs", "completed")
_LOGS_EVERY_S = 1.0  # Replicate throttles `logs` webhooks too; a log line per step would flood a receiver
_WATCH_EVERY_S = 0.5


def check_webhook(url: str | None, events: list[str] | None) -> None:
    """A 422-class error for a webhook that is not an http(s) URL or an event filter naming unknown events."""
    if url is not None and not url.startswith(("http://", "https://")):
        raise UsageError(f"webhook: expected an http:// or https:// URL, got {url[:80]!r}")
    unknown = [e for e in events or () if e not in EVENTS]
    if unknown:
        raise UsageError(f"webhook_events_filter: unknown event {unknown[0]!r}",
                         f"choose from {', '.join(EVENTS)}")


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
    """One delivery thread with its own schedule: deliveries in one lane go out in order."""

    def __init__(self, sender: WebhookSender, index: int):
        self.sender = sender
        self.heap: list[_Delivery] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"webhooks-{index}", daemon=True)

    def put(self, delivery: _Delivery) -> None:
        with self.cond:
            heapq.heappush(self.heap, delivery)
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.sender.stopped and (not self.heap or time.monotonic() > self.sender.drain_until):
                        return
                    now = time.monotonic()
                    if self.heap and self.heap[0].due <= now:
                        delivery = heapq.heappop(self.heap)
                        break
                    wait = (self.heap[0].due - now) if self.heap else None
                    self.cond.wait(min(wait, 0.5) if wait is not None else 0.5)
            self.sender.attempt(self, delivery)


class WebhookSender:
    """Delivers signed POSTs in background threads; a failed one is retried ``attempts`` times in all, waiting
    ``backoff_s`` * 2^n between tries. Deliveries for one key (a training id) keep their order."""

    def __init__(self, lanes: int = 4, attempts: int = 6, backoff_s: float = 1.0, timeout_s: float = 10.0):
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self.stopped = False
        self.drain_until = 0.0
        self._seq = 0
        self._lock = threading.Lock()
        self._lanes = [_Lane(self, i) for i in range(lanes)]
        self.delivered = 0  # counters, for tests and the server's log
        self.failed = 0

    def start(self) -> None:
        for lane in self._lanes:
            lane.thread.start()

    def stop(self, drain_s: float = 2.0) -> None:
        """Stop after sending what is due within ``drain_s`` (retries further out are dropped)."""
        self.drain_until = time.monotonic() + drain_s
        self.stopped = True
        for lane in self._lanes:
            with lane.cond:
                lane.cond.notify()
        for lane in self._lanes:
            if lane.thread.is_alive():
                lane.thread.join(timeout=drain_s + self.timeout_s)

    def send(self, key: str, url: str, payload: dict[str, Any], secret: str) -> str:
        """Queue one message; returns its ``webhook-id``."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        msg_id = "msg_" + os.urandom(12).hex()
        with self._lock:
            self._seq += 1
            seq = self._seq
        lane = self._lanes[hash(key) % len(self._lanes)]
        lane.put(_Delivery(time.monotonic(), seq, url, body, secret, msg_id))
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
            status = _post(d.url, d.body, headers, self.timeout_s)
            if 200 <= status < 300:
                self.delivered += 1
                return
            problem = f"HTTP {status}"
        except (OSError, ValueError, http.client.HTTPException) as err:  # refused, timed out, unreachable, bad URL
            problem = f"{type(err).__name__}: {err}"
        d.attempt += 1
        if d.attempt >= self.attempts or self.stopped:
            self.failed += 1
            log.warning("webhook %s to %s failed after %d attempts (%s)", d.msg_id, d.url, d.attempt, problem)
            return
        d.due = time.monotonic() + self.backoff_s * 2 ** (d.attempt - 1)
        lane.put(d)


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url[:100]}")
    conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_type(parts.hostname, parts.port, timeout=timeout_s)
    try:
        conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- events
@dataclass
class _Watch:
    base_url: str
    sent_start: bool = False
    sent_output: bool = False
    log_size: int = 0
    last_logs: float = 0.0


class TrainingWebhooks:
    """Turns changes of training records into webhook events.

    ``training_object(record, base_url)`` builds the payload; ``secret(owner)`` gives the account's signing
    secret; ``owner_of(record)`` names the account a training belongs to.
    """

    def __init__(self, trainings: Trainings, sender: WebhookSender,
                 training_object: Callable[[TrainingRecord, str], dict[str, Any]],
                 secret: Callable[[str], str], owner_of: Callable[[TrainingRecord], str], base_url: str):
        self.trainings, self.sender = trainings, sender
        self.training_object, self.secret, self.owner_of = training_object, secret, owner_of
        self.base_url = base_url
        self._watched: dict[str, _Watch] = {}
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="webhook-watch", daemon=True)

    def start(self) -> None:
        """Resume watching the registry's unfinished trainings that have a webhook, then start."""
        for record in self.trainings.list():
            if record.status not in FINAL and _webhook(record):
                self._watched[record.id] = _Watch(self.base_url, sent_start=True)
        self.sender.start()
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._check_all()  # a last look: events of trainings the queue just settled
        self.sender.stop()

    def watch(self, record: TrainingRecord, base_url: str | None = None) -> None:
        """Follow ``record`` (a new training): ``start`` is sent now, the rest as it happens."""
        if not _webhook(record):
            return
        with self._lock:
            self._watched[record.id] = _Watch(base_url or self.base_url)
            self._lock.notify_all()
        self._check(record.id)

    def poke(self) -> None:
        """Look now rather than at the next tick (the queue calls this when a training starts or ends)."""
        with self._lock:
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                self._lock.wait(_WATCH_EVERY_S)
                if self._stopping:
                    return
            self._check_all()

    def _check_all(self) -> None:
        with self._lock:
            ids = list(self._watched)
        for training_id in ids:
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
        if size > watch.log_size and (final or now - watch.last_logs >= _LOGS_EVERY_S):
            watch.log_size, watch.last_logs = size, now
            events.append("logs")
        if record.output and not watch.sent_output:
            watch.sent_output = True
            events.append("output")
        if final:
            events.append("completed")
            with self._lock:
                self._watched.pop(training_id, None)
        events = [e for e in events if e in wanted]
        if not events:
            return
        payload = self.training_object(record, watch.base_url)
        secret = self.secret(self.owner_of(record))
        for _ in events:  # one message per event, as Replicate sends them
            self.sender.send(training_id, url, payload, secret)


def _webhook(record: TrainingRecord) -> str | None:
    return getattr(record, "webhook", None)


def record_events(record: TrainingRecord) -> list[str]:
    """The events a training's webhook wants (all four unless filtered)."""
    chosen = getattr(record, "webhook_events_filter", None)
    return list(chosen) if chosen else list(EVENTS)
