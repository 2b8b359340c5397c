"""The trainings side of the server: the queue and the webhooks, started and stopped with the app.

``build_api`` builds one :class:`TrainingService` and adds it to ``app.state.services``; the trainings routes
reach it as ``request.app.state.trainings``. Starting it recovers the registry's waiting trainings (see
:class:`~finetune.queue.TrainingQueue`); stopping it puts running trainings back in the queue.

It applies the server's training limits (:class:`~finetune.server.settings.ServerSettings`): an account's queued
and running trainings are capped (429), ``train.max_steps`` is bounded (422), and the queue stops a run past
the time limit (it fails, saying so).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..config import Config
from ..errors import ConfigError, LimitError
from ..queue import Executor, LocalExecutor, TrainingQueue
from ..queue.events import FileWatcher, TrainingEvents
from ..registry import Registry
from ..registry.accounts import Accounts
from ..registry.jobs import FINAL, TrainingRecord, Trainings
from .access import owner_of
from .settings import ServerSettings
from .webhook_targets import WebhookPolicy
from .webhooks import TrainingWebhooks, WebhookSender


class TrainingService:
    """Submit, queue, cancel and announce (webhooks) trainings for one server."""

    def __init__(self, registry: Registry, settings: ServerSettings, accounts: Accounts,
                 training_object: Callable[[TrainingRecord, str], dict[str, Any]],
                 executor: Executor | None = None, webhook_policy: WebhookPolicy | None = None):
        self.registry = registry
        self.trainings = Trainings(registry)
        self.settings = settings
        self._executor = executor
        self._training_object = training_object
        self.accounts = accounts
        self.queue: TrainingQueue | None = None
        self._lock = threading.Lock()
        self._submitting: Counter[str] = Counter()  # per account: submits past the cap check, not yet queued
        # Every follower of a training's progress subscribes here: the webhooks, the web app's live page.
        self.events = TrainingEvents()
        self.watcher = FileWatcher(self.events, self.trainings)  # for the runs no local worker reports on
        self.webhooks = TrainingWebhooks(
            self.trainings, WebhookSender(policy=webhook_policy), training_object, accounts.webhook_secret, owner_of,
            base_url=settings.public_base_url or f"http://{settings.host}:{settings.port}", events=self.events,
        )

    def start(self) -> None:
        executor = self._executor
        if executor is None and self.settings.cluster is not None:
            from ..cluster.executor import RayExecutor

            executor = RayExecutor(self.registry, self.settings.cluster, workers=self.settings.workers)
        if executor is None:
            executor = LocalExecutor(self.registry.root, workers=self.settings.workers,
                                     prestart=self.settings.train_prestart)
        report_to = getattr(executor, "report_to", None)
        if report_to is not None:  # its workers report their trainings' progress
            report_to(self._worker_event)
        self.queue = TrainingQueue(self.registry, executor, listener=self._queue_event,
                                   owner_of=owner_of, max_run_s=self.settings.max_training_time_s)
        self.queue.start()
        self.webhooks.start()
        self.watcher.start()

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.stop()
        self.watcher.stop()
        self.webhooks.stop()

    def abort(self) -> None:
        """The server failed to start after this service started: stop, leaving adopted runs alone."""
        if self.queue is not None:
            self.queue.stop(abort=True)
        self.watcher.stop()
        self.webhooks.stop()

    def _worker_event(self, training_id: str, event: dict[str, Any]) -> None:
        """One event of a local worker's training, passed on to the followers (see finetune.queue.events)."""
        kind = event.get("kind")
        if kind == "attached":
            self.events.feeding(training_id, True)
        elif kind == "exit":
            self.events.feeding(training_id, False)
            self.events.publish(training_id, "exit", {"code": event.get("code"), "how": event.get("how")})
        elif kind in ("status", "metrics", "log"):
            self.events.publish(training_id, kind, {k: v for k, v in event.items() if k != "kind"})

    def _queue_event(self, event: str, training_id: str) -> None:
        if event == "ended":  # whatever its worker said or did not say: nobody reports on it any more
            self.events.feeding(training_id, False)
        self._record_changed(training_id)

    def _record_changed(self, training_id: str) -> None:
        """The queue changed the training's record (queued, started, settled): its followers hear the status."""
        try:
            status = self.trainings.get(training_id).status
        except Exception:  # deleted meanwhile: nobody to tell
            return
        self.events.publish(training_id, "status", {"status": getattr(status, "value", status)})

    def check_limits(self, config: Config) -> None:
        """422 for a config over the server's step limit (the time limit is the queue's to apply)."""
        limit, steps = self.settings.max_training_steps, config.train.max_steps
        if limit is not None and steps is not None and steps > limit:
            raise ConfigError([("train.max_steps", f"train.max_steps: {steps} is over this server's limit of "
                                                    f"{limit} steps (--max-training-steps)")], source="input")

    @contextmanager
    def _slot(self, owner: str) -> Iterator[None]:
        """Count one more training of ``owner`` while it is submitted, or 429 when the account is at its cap."""
        cap = self.settings.max_trainings_per_account
        assert self.queue is not None, "the service is not started"
        with self._lock:
            held = self.queue.count(owner) + self._submitting[owner]
            if cap is not None and held >= cap:
                raise LimitError(f"{owner} has {held} trainings queued or running, this server's limit per "
                                 f"account (--max-trainings-per-account {cap})",
                                 "wait for one to end, or cancel one")
            self._submitting[owner] += 1
        try:
            yield
        finally:
            with self._lock:
                self._submitting[owner] -= 1

    def submit(self, config: Config, destination: str, *, webhook: str | None = None,
               webhook_events_filter: list[str] | None = None, base_url: str | None = None) -> TrainingRecord:
        """Write the record (durable when this returns), then queue it; ``start`` goes out to the webhook."""
        from ..training.submit import submit_training  # no torch in the server

        self.check_limits(config)
        with self._slot(destination.split("/", 1)[0]):
            record = submit_training(config, registry=self.registry, destination=destination, source="api")
            if webhook:
                record = self.trainings.update(record, webhook=webhook, webhook_events_filter=webhook_events_filter)
            self.webhooks.watch(record, base_url)
            assert self.queue is not None, "the service is not started"
            self.queue.submit(record.id)
        return record

    def cancel(self, training_id: str) -> TrainingRecord:
        """Cancel a queued or running training; one that already ended is returned as it is."""
        record = self.trainings.get(training_id)
        if record.status in FINAL:
            return record
        assert self.queue is not None, "the service is not started"
        try:
            return self.queue.cancel(training_id)
        finally:
            self._record_changed(training_id)
