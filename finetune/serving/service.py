"""Predictions as a service: durable records, inference workers, waiting, streaming, cancel, webhooks.

The HTTP routes (server/routes/predictions.py) are a thin layer over :class:`PredictionService`:

* :meth:`~PredictionService.create` (``create_async`` on an event loop) checks the input against the version's
  schema and the server's limits (the prompt's size; each account's predictions starting or running at once,
  429 past ``max_per_account``), hands the prediction to a worker and waits for the worker to admit it (the
  prompt rendered, tokenized and within the context) — a rejection is raised as the
  :class:`~finetune.errors.FinetuneError` it is (a 4xx; 503 when the worker died first), and no record is kept;
* the worker's events update the record in memory (output pieces appended as they come) and on disk (on every
  status change, and at most every :data:`SAVE_EVERY_S` while output streams);
* :meth:`~PredictionService.wait_async` awaits the end of a prediction or a timeout (``Prefer: wait``) on the
  event loop, holding no thread; :meth:`~PredictionService.subscribe` yields its output pieces and end as they
  happen (Server-Sent Events);
* :meth:`~PredictionService.cancel` stops it within a decoding step; a prediction its worker no longer answers
  for is settled ``canceled`` by the service itself, so cancel always ends it.

Versions map to workers by their base, so the versions of one base share that worker's memory. With
``pool`` (``--predict-executor ray``) one worker object routes over Ray actors itself
(:class:`finetune.cluster.inference.RayInferencePool`); the record's ``placement`` names the node. The web app's
comparisons run on the same workers (:attr:`~PredictionService.comparisons`).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import ConflictError, LimitError
from ..registry import Registry, Version
from ..registry.jobs import FINAL, Status
from ..registry.manifest import utc_now
from ..registry.predictions import PredictionRecord, Predictions, new_prediction_id
from .comparisons import Comparisons
from .inputs import check_events_filter
from .live import LivePrediction, copy_record, final_event, publish, rejection_error, seconds_between
from .schema import DEFAULT_MAX_PROMPT_BYTES, check_input, prompt_format
from .worker import LocalWorker, OnEvent, WorkerConfig, WorkerProcess

DEFAULT_MAX_PER_ACCOUNT = 16  # predictions starting or running at once per account (finetune serve flag)
ADMIT_TIMEOUT_S = 300.0  # a worker that neither admits, rejects nor dies in this long is stuck
CANCEL_WAIT_S = 5.0  # a worker ends a canceled prediction within a step; past this the service settles it
SAVE_EVERY_S = 1.0
WEBHOOK_EVERY_S = 0.5  # output and logs webhooks, like Replicate's, at most this often

# A webhook sender: (the record, the prediction object as JSON, the event) -> None; it delivers in the
# background (to record.webhook, signed with record.owner's secret).
WebhookSender = Callable[[PredictionRecord, dict[str, Any], str], None]


class PredictionService:
    """Creates, runs, records and streams predictions for one registry."""

    def __init__(self, registry: Registry, config: WorkerConfig | None = None, workers: int = 1,
                 in_process: bool = False, webhook_sender: WebhookSender | None = None,
                 to_object: Callable[[PredictionRecord, str], dict[str, Any]] | None = None, prestart: bool = False,
                 max_prompt_bytes: int | None = DEFAULT_MAX_PROMPT_BYTES,
                 max_per_account: int | None = DEFAULT_MAX_PER_ACCOUNT,
                 pool: Callable[[WorkerConfig, OnEvent], Any] | None = None):
        self.registry = registry
        self.max_prompt_bytes = max_prompt_bytes
        self.max_per_account = max_per_account
        self.records = Predictions(registry)
        self.config = config or WorkerConfig(str(registry.root))
        if pool is not None:  # one worker that routes over many (Ray actors: finetune.cluster.inference)
            self._workers = [pool(self.config, self._on_event)]
        else:
            kind = LocalWorker if in_process else WorkerProcess
            self._workers = [kind(self.config, self._on_event) for _ in range(max(1, workers))]
        self._live: dict[str, LivePrediction] = {}
        self._lock = threading.RLock()
        self.webhook_sender = webhook_sender
        self.prestart = prestart
        self.to_object = to_object or (lambda record, base_url: record.to_dict())
        self.interrupted, self._owners = self.records.recover()  # one listing of the records, through the index
        self.comparisons = Comparisons(self._worker_for)

    def start(self) -> None:
        """With ``prestart``, start the worker processes now (in the background), so the first prediction does
        not wait for them; otherwise the first prediction starts them."""
        for worker in self._workers if self.prestart else ():
            if hasattr(worker, "_ensure"):
                threading.Thread(target=_quietly(worker._ensure), name="finetune-worker-start", daemon=True).start()

    def stop(self) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.close()

    def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker's cache accounting (loaded bases and versions, bytes) and batching counters."""
        return [worker.stats() for worker in self._workers]

    # ------------------------------------------------------------------ create
    def _worker_for(self, version: Version) -> Any:
        if len(self._workers) == 1:
            return self._workers[0]
        from ..registry.lineage import lineage

        root = lineage(self.registry, version)[-1]  # the versions of one base share one worker's memory
        digest = hashlib.sha256(root.id.encode()).digest()
        return self._workers[int.from_bytes(digest[:4], "big") % len(self._workers)]

    def submit(self, version: Version, data: Any, owner: str = "", stream: bool = False,
               webhook: str | None = None, webhook_events_filter: list[str] | None = None,
               base_url: str = "") -> LivePrediction:
        """Check a prediction and hand it to its worker, without waiting: the caller then waits for admission
        (:meth:`create` or :meth:`create_async`). Raises :class:`UsageError` (422) for input the version cannot
        take, naming the field, and :class:`LimitError` (429) past the account's limit."""
        checked = check_input(prompt_format(version.metadata), data, self.max_prompt_bytes)  # before any worker
        events = check_events_filter(webhook_events_filter)
        record = PredictionRecord(
            id=new_prediction_id(), model=version.model, version=version.id, version_ref=version.ref, owner=owner,
            input=dict(data), output=None, stream=bool(stream), webhook=webhook, webhook_events_filter=events,
            created_at=utc_now(),
        )
        worker = self._worker_for(version)
        live = LivePrediction(record, worker=worker, base_url=base_url)
        with self._lock:
            if self.max_per_account is not None:
                mine = sum(1 for other in self._live.values() if other.record.owner == owner)
                if mine >= self.max_per_account:
                    raise LimitError(
                        f"{owner or 'this account'} has {mine} predictions starting or running, the most this server "
                        f"allows at once per account (finetune serve --predict-max-per-account "
                        f"{self.max_per_account})", "wait for one to finish, or cancel one")
            self._live[record.id] = live
        try:
            worker.submit(record.id, version.ref, checked, owner)
        except Exception:
            with self._lock:
                self._live.pop(record.id, None)
            raise
        return live

    def create(self, version: Version, data: Any, owner: str = "", stream: bool = False,
               webhook: str | None = None, webhook_events_filter: list[str] | None = None,
               base_url: str = "", admit_timeout: float = ADMIT_TIMEOUT_S) -> PredictionRecord:
        """Start a prediction; returns its record once a worker admitted it. Blocks (call it from a thread).

        Raises what :meth:`submit` raises, and whatever the worker's check raised (a prompt longer than the
        context, a template that rejects the messages), or :class:`UnavailableError` (503) if the worker died.
        """
        live = self.submit(version, data, owner, stream, webhook, webhook_events_filter, base_url)
        return self._admission(live, live.admitted.wait(admit_timeout))

    async def create_async(self, version: Version, data: Any, owner: str = "", stream: bool = False,
                           webhook: str | None = None, webhook_events_filter: list[str] | None = None,
                           base_url: str = "", admit_timeout: float = ADMIT_TIMEOUT_S) -> PredictionRecord:
        """:meth:`create` for an event loop: the wait for admission holds no thread."""
        live = self.submit(version, data, owner, stream, webhook, webhook_events_filter, base_url)
        return self._admission(live, await live.admitted.wait_async(admit_timeout))

    def _admission(self, live: LivePrediction, admitted: bool) -> PredictionRecord:
        record_id = live.record.id
        if not admitted:
            live.worker.cancel(record_id)
            with self._lock:
                self._live.pop(record_id, None)
            raise ConflictError("the inference worker did not take the prediction in time", "retry in a moment")
        if live.rejection is not None:
            with self._lock:
                self._live.pop(record_id, None)
            raise rejection_error(live.rejection)
        return self.get(record_id)

    # ------------------------------------------------------------------ events from workers
    def _on_event(self, prediction_id: str, kind: str, payload: dict[str, Any]) -> None:
        if kind == "compared" or self.comparisons.owns(prediction_id):
            self.comparisons.on_event(prediction_id, kind, payload)
            return
        with self._lock:
            live = self._live.get(prediction_id)
        if live is None:
            return
        record = live.record
        if kind == "rejected":
            live.rejection = payload
            live.admitted.set()
            return
        if kind == "done" and not live.admitted.is_set():  # the worker died before it took the prediction
            live.rejection = {"status": 503, "type": "UnavailableError",
                              "detail": f"{payload.get('error') or 'the inference worker stopped'}; nothing was kept, "
                                        "and a fresh worker starts with the next request: retry"}
            live.admitted.set()
            return
        if kind == "admitted":
            with self._lock:
                record.metrics["input_token_count"] = payload["input_token_count"]
                record.placement = payload.get("placement")
                self.records.create(record)
                self._owners[record.id] = record.owner
                live.saved_at = time.monotonic()
            live.admitted.set()
            self._webhook(live, "start")
            return
        if not live.admitted.wait(30.0):  # events come in order; the record exists once admitted
            return
        if kind == "placement":  # moved to another worker before it started (its worker was lost)
            with self._lock:
                record.placement = payload.get("placement")
                self._save(live)
        elif kind == "processing":
            with self._lock:
                if record.status == Status.STARTING:
                    record.status, record.started_at = Status.PROCESSING, utc_now()
                    self._save(live)
        elif kind == "log":
            with self._lock:
                record.logs += payload["text"] + "\n"
                targets = list(live.subscribers)
            publish(targets, "logs", payload["text"])
            self._webhook(live, "logs")
        elif kind == "output":
            with self._lock:  # appended and announced under one lock: a new subscriber sees it exactly once
                record.output = (record.output or []) + [payload["text"]]
                if time.monotonic() - live.saved_at >= SAVE_EVERY_S:
                    self._save(live)
                targets = list(live.subscribers)
            publish(targets, "output", payload["text"])
            self._webhook(live, "output")
        elif kind == "done":
            with self._lock:
                status = Status(payload["status"])
                record.status = status
                record.error = payload.get("error")
                record.metrics.update(payload.get("metrics") or {})
                if record.output is None:
                    record.output = []
                record.completed_at = utc_now()
                record.started_at = record.started_at or record.completed_at
                record.metrics["total_time"] = round(seconds_between(record.created_at, record.completed_at), 6)
                self._save(live)
                self._live.pop(prediction_id, None)
                targets = list(live.subscribers)
            live.finished.set()
            publish(targets, *final_event(record))
            self._webhook(live, "completed")

    def _save(self, live: LivePrediction) -> None:
        self.records.save(live.record)
        live.saved_at = time.monotonic()

    def _webhook(self, live: LivePrediction, event: str) -> None:
        record = live.record
        if not record.webhook or self.webhook_sender is None:
            return
        if record.webhook_events_filter is not None and event not in record.webhook_events_filter:
            return
        if event in ("output", "logs") and time.monotonic() - live.webhook_at < WEBHOOK_EVERY_S:
            return
        live.webhook_at = time.monotonic()
        with self._lock:
            body = self.to_object(copy_record(record), live.base_url)
        try:
            self.webhook_sender(record, body, event)
        except Exception:  # a webhook problem never fails the prediction
            pass

    # ------------------------------------------------------------------ read
    def get(self, prediction_id: str) -> PredictionRecord:
        with self._lock:
            live = self._live.get(prediction_id)
            if live is not None and live.admitted.is_set() and live.rejection is None:
                return copy_record(live.record)
        return self.records.get(prediction_id)

    def list_ids(self, owner: str | None = None) -> list[str]:
        """The ids of every prediction (of ``owner``, when given), newest first."""
        ids = self.records.ids()
        return ids if owner is None else [i for i in ids if self._owners.get(i) == owner]

    def wait(self, prediction_id: str, timeout: float) -> PredictionRecord:
        """The prediction once it ended, or as it stands after ``timeout`` seconds. Blocks this thread."""
        with self._lock:
            live = self._live.get(prediction_id)
        if live is not None:
            live.finished.wait(max(0.0, timeout))
        return self.get(prediction_id)

    async def wait_async(self, prediction_id: str, timeout: float) -> PredictionRecord:
        """:meth:`wait` for an event loop: it holds no thread while it waits (``Prefer: wait``)."""
        with self._lock:
            live = self._live.get(prediction_id)
        if live is not None:
            await live.finished.wait_async(max(0.0, timeout))
        return self.get(prediction_id)

    # ------------------------------------------------------------------ cancel
    def cancel(self, prediction_id: str) -> PredictionRecord:
        """Stop a prediction; an ended one is returned as it is (canceling it again changes nothing)."""
        live = self._ask_to_cancel(prediction_id)
        if live is None:
            return self.records.get(prediction_id)
        if not live.finished.wait(CANCEL_WAIT_S):  # a step or two; the worker answers with the final record
            self._settle_canceled(live)
        return self.get(prediction_id)

    async def cancel_async(self, prediction_id: str) -> PredictionRecord:
        """:meth:`cancel` for an event loop: the wait for the worker's answer holds no thread."""
        live = self._ask_to_cancel(prediction_id)
        if live is None:
            return self.records.get(prediction_id)
        if not await live.finished.wait_async(CANCEL_WAIT_S):
            self._settle_canceled(live)
        return self.get(prediction_id)

    def _ask_to_cancel(self, prediction_id: str) -> LivePrediction | None:
        with self._lock:
            live = self._live.get(prediction_id)
        if live is not None:
            live.worker.cancel(prediction_id)
        return live

    def _settle_canceled(self, live: LivePrediction) -> None:
        """The worker did not end a canceled prediction: end it here, so that it is never left running. (Should
        the worker still send an end later, it finds no live prediction and changes nothing.)"""
        if live.admitted.is_set() and live.rejection is None:
            self._on_event(live.record.id, "done", {"status": "canceled", "metrics": {},
                                                    "error": None})

    # ------------------------------------------------------------------ stream
    async def subscribe(self, prediction_id: str, cancel_on_disconnect: bool = True) -> AsyncIterator[tuple[str, str]]:
        """``(event, data)`` pairs: the output so far, then each new piece, then ``done`` or ``error``.

        When the consumer goes away before the end (a client disconnected) and ``cancel_on_disconnect``, the
        prediction is canceled, so no worker keeps generating for nobody.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            live = self._live.get(prediction_id)
            record = copy_record(live.record) if live is not None else None
            if live is not None:
                live.subscribers.append((loop, q))
        if record is None:
            record = self.records.get(prediction_id)
        finished = False
        try:
            for piece in record.output or []:
                yield "output", piece
            if live is None or record.status in FINAL:
                finished = True
                yield final_event(record)
                return
            while True:
                event, data = await q.get()
                if event in ("done", "error"):
                    finished = True
                    yield event, data
                    return
                yield event, data
        finally:
            if live is not None:
                with self._lock:
                    if (loop, q) in live.subscribers:
                        live.subscribers.remove((loop, q))
                    alone = not live.subscribers
                if not finished and cancel_on_disconnect and alone and not live.finished.is_set():
                    threading.Thread(target=self.cancel, args=(prediction_id,), daemon=True).start()


def _quietly(fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception:  # reported again, with its reason, by the first prediction that needs the worker
            pass
    return run
