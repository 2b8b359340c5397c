"""The trainings side of the server: the queue and the webhooks, started and stopped with the app.

``create_app`` builds one :class:`TrainingService` and adds it to ``app.state.services``; the trainings routes
reach it as ``request.app.state.trainings``. Starting it recovers the registry's waiting trainings (see
:class:`~finetune.queue.TrainingQueue`); stopping it puts running trainings back in the queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import Config
from ..queue import Executor, LocalExecutor, TrainingQueue
from ..registry import Registry
from ..registry.accounts import Accounts
from ..registry.jobs import FINAL, TrainingRecord, Trainings
from .access import owner_of
from .settings import ServerSettings
from .webhooks import TrainingWebhooks, WebhookSender


class TrainingService:
    """Submit, queue, cancel and announce (webhooks) trainings for one server."""

    def __init__(self, registry: Registry, settings: ServerSettings, accounts: Accounts,
                 training_object: Callable[[TrainingRecord, str], dict[str, Any]],
                 executor: Executor | None = None):
        self.registry = registry
        self.trainings = Trainings(registry)
        self.settings = settings
        self._executor = executor
        self._training_object = training_object
        self.accounts = accounts
        self.queue: TrainingQueue | None = None
        self.webhooks = TrainingWebhooks(
            self.trainings, WebhookSender(), training_object, accounts.webhook_secret, owner_of,
            base_url=settings.public_base_url or f"http://{settings.host}:{settings.port}",
        )

    def start(self) -> None:
        executor = self._executor
        if executor is None and self.settings.cluster is not None:
            from ..cluster.executor import RayExecutor

            executor = RayExecutor(self.registry, self.settings.cluster, workers=self.settings.workers)
        if executor is None:
            executor = LocalExecutor(self.registry.root, workers=self.settings.workers)
        self.queue = TrainingQueue(self.registry, executor, listener=lambda event, _id: self.webhooks.poke())
        self.queue.start()
        self.webhooks.start()

    def stop(self) -> None:
        if self.queue is not None:
            self.queue.stop()
        self.webhooks.stop()

    def submit(self, config: Config, destination: str, *, webhook: str | None = None,
               webhook_events_filter: list[str] | None = None, base_url: str | None = None) -> TrainingRecord:
        """Write the record (durable when this returns), then queue it; ``start`` goes out to the webhook."""
        from ..training.submit import submit_training  # no torch in the server

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
            self.webhooks.poke()
