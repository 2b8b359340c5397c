"""The HTTP API of ``finetune serve``: a thin adapter over the registry, the queue and the inference workers.

``build_api(registry, settings)`` builds a FastAPI app whose state holds the registry, the settings, the
accounts, a version-id index and a cache of version JSON; routers come from :mod:`finetune.server.routes`.
Long-lived services (the registry's server lock, the training queue, inference workers) join
``app.state.services``: each has ``start()`` and ``stop()``, called when the server starts and stops. A service
may also have ``abort()``, called instead of ``stop()`` when a later service failed to start: a failed start
leaves alone the work it found running (runs a previous server's queue started).

The whole application (this API and the web app beside it) is assembled by :func:`finetune.app.create_app`: the
server knows nothing of the web app.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from .. import __version__
from ..registry import Registry
from ..registry.accounts import Accounts
from ..registry.index import VersionIndex
from . import docs, problems
from .head import HeadAsGet
from .instance import ServerLock
from .limits import FRAMING_BYTES, BodyLimit
from .objects import training_object
from .routes import account, files, models, openai, predictions, trainings, versions
from .settings import ServerSettings
from .training_service import TrainingService
from .webhook_targets import WebhookPolicy
from .wire_cache import VersionJSON

if TYPE_CHECKING:
    from ..registry.predictions import PredictionRecord
    from ..serving.service import PredictionService

__all__ = ["ServerSettings", "build_api"]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    started = []
    try:
        for service in app.state.services:
            service.start()
            started.append(service)
    except BaseException:
        for service in reversed(started):
            getattr(service, "abort", service.stop)()
        raise
    try:
        yield
    finally:
        for service in reversed(started):
            service.stop()


def _prediction_service(registry: Registry, settings: ServerSettings, app: FastAPI) -> PredictionService:
    """Inference workers and prediction records (no torch in this process: the workers load the models).
    Webhooks go out through the trainings' sender (signed with the owner's secret, retried)."""
    from ..serving.service import PredictionService
    from ..serving.worker import WorkerConfig

    sender, accounts = app.state.trainings.webhooks.sender, app.state.accounts

    def send(record: PredictionRecord, body: dict[str, Any], event: str) -> None:
        sender.send(record.id, record.webhook, body, accounts.webhook_secret(record.owner), account=record.owner)

    config = WorkerConfig(str(registry.root), device=settings.predict_device,
                          memory_budget_mb=settings.predict_memory_mb, max_batch=settings.predict_max_batch,
                          max_prompt_tokens=settings.predict_max_prompt_tokens, threads=settings.predict_threads)
    pool = None
    if settings.predict_cluster is not None:  # Ray actors (finetune.cluster.inference), created when it starts
        from ..cluster.inference import RayInferencePool

        options, count = settings.predict_cluster, settings.predict_workers
        pool = lambda config, on_event: RayInferencePool(config, on_event, options, count)  # noqa: E731
    return PredictionService(registry, config, workers=settings.predict_workers, prestart=settings.predict_prestart,
                             to_object=predictions.prediction_object, webhook_sender=send,
                             max_prompt_bytes=settings.predict_max_prompt_bytes,
                             max_per_account=settings.predict_max_per_account, pool=pool)


def build_api(registry: Registry | None = None, settings: ServerSettings | None = None) -> FastAPI:
    """The HTTP API over ``registry`` (default: ``$FINETUNE_HOME``) with ``settings`` (default: localhost)."""
    registry = registry if registry is not None else Registry()
    settings = settings or ServerSettings()
    # FastAPI's docs page loads Swagger UI from a CDN: ours (finetune.server.docs) is local and opt-in
    app = FastAPI(title="finetune", version=__version__, lifespan=_lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.settings = settings
    app.state.accounts = Accounts(registry)
    app.state.version_index = VersionIndex(registry)
    app.state.version_json = VersionJSON()
    # One registry, one server: the lock comes first, so that a second server touches nothing (see .instance).
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    app.state.server_lock = ServerLock(registry, settings.public_base_url or f"http://{host}:{settings.port}")
    app.state.services = [app.state.server_lock]  # objects with start()/stop(), e.g. the training queue
    problems.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes + FRAMING_BYTES)
    app.add_middleware(HeadAsGet, router=app.router)

    app.include_router(account.router)
    app.include_router(models.router)
    app.include_router(versions.router)
    app.include_router(files.router)
    app.include_router(trainings.router)
    # The queue and the webhooks: started with the server (recovering waiting trainings), stopped with it.
    app.state.webhook_policy = WebhookPolicy(settings.allow_webhook_hosts, (settings.host, settings.port))
    app.state.trainings = TrainingService(registry, settings, app.state.accounts,
                                          lambda record, url: training_object(registry, record, url),
                                          webhook_policy=app.state.webhook_policy)
    app.state.services.append(app.state.trainings)
    app.state.predictions = _prediction_service(registry, settings, app)
    app.state.services.append(app.state.predictions)
    app.include_router(predictions.router)
    app.include_router(openai.router)  # the OpenAI API over the same predictions, under /openai/v1
    if settings.api_docs:
        docs.install(app)
    return app
