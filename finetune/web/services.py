"""The web app's calls into the service: uploads, trainings, predictions.

Each function hands over to what the HTTP API uses for the same action, so that a file uploaded, a training
started or a prediction run from a page is the same object, checked by the same rules, as one made with the API.
This module only adapts arguments; it holds no rule of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Request

from ..config import Config
from ..errors import NotFoundError, UsageError
from ..registry import Registry, Version


def _registry(request: Request) -> Registry:
    return request.app.state.registry


# ---------------------------------------------------------------- files (the API's file store)
def _files(request: Request) -> Any:
    try:
        from ..registry.files import Files
    except ImportError:  # the file store lands with the API's /v1/files
        raise UsageError("this server does not store uploaded files yet") from None
    return Files(_registry(request))


def list_files(request: Request, account: str) -> list[Any]:
    """The account's uploaded files, newest first."""
    return _files(request).list(account)


async def store(request: Request, account: str, upload: Any) -> Any:
    """Store an uploaded file for ``account`` with the server's upload limit, as ``POST /v1/files`` does."""
    from starlette.concurrency import run_in_threadpool

    limit = request.app.state.settings.max_upload_bytes
    return await run_in_threadpool(_files(request).create, account, upload.file, upload.filename,
                                   upload.content_type or "application/octet-stream", None, limit)


async def store_once(request: Request, account: str, upload: Any) -> Any:
    """:func:`store`, except that the same bytes uploaded again under the same name are the file already there
    (the copy is dropped), so a picker never lists one file twice."""
    from starlette.concurrency import run_in_threadpool

    stored = await store(request, account, upload)
    same = next((f for f in list_files(request, account)
                 if f.id != stored.id and f.name == stored.name and f.sha256 == stored.sha256), None)
    if same is None:
        return stored
    await run_in_threadpool(_files(request).delete, stored.id)
    return same


def delete_file(request: Request, account: str, file_id: str) -> Any:
    """Delete an uploaded file as ``DELETE /v1/files/{id}`` does (404 for another's; 409 while a training that
    has not ended reads it); the deleted file's record."""
    from ..server.routes.files import remove_file

    return remove_file(_registry(request), account, file_id)


def file_of(request: Request, account: str, file_id: str) -> Any:
    """An uploaded file of ``account`` (404 for someone else's, by the access rule)."""
    from ..server import access

    stored = _files(request).get(file_id)
    access.check_owns(account, stored, "file", file_id, NotFoundError)
    return stored


def path_of(request: Request, account: str, file_id: str) -> Path:
    """Where an uploaded file of ``account`` lies (404 for someone else's, by the access rule)."""
    return file_of(request, account, file_id).path


# ---------------------------------------------------------------- models (the API's model routes)
def edit_model(request: Request, account: str, name: str, changes: dict[str, Any]) -> Any:
    """Edit a model as ``PATCH /v1/models/{owner}/{name}`` does (owner only; the registry's text limits)."""
    from ..server.routes.models import edit_model as api_edit_model

    return api_edit_model(_registry(request), account, name, changes)


def delete_model(request: Request, account: str, name: str) -> None:
    """Delete a model as ``DELETE /v1/models/{owner}/{name}`` does (owner only; refused while it has versions)."""
    from ..server.routes.models import remove_model

    remove_model(_registry(request), account, name)


# ---------------------------------------------------------------- trainings (the API's training service)
def training_config(request: Request, account: str, raw: dict[str, Any], trainer_ref: str) -> Config:
    """The checked config of a training of ``trainer_ref`` with ``raw`` as its input, exactly as
    ``POST .../trainings`` checks it (data files resolved to the account's uploads): :class:`ConfigError`
    for the config, other errors for the data (a foreign file is 404, a server path 403)."""
    from ..registry.accounts import Account
    from ..server.routes.trainings import training_config as api_training_config

    return api_training_config(raw, trainer_ref, request, Account(account), request.app.state.settings)


def start_training(request: Request, account: str, config: Config, destination: str) -> Any:
    """Queue a checked config into ``destination`` through the training service; the record."""
    from ..server.context import base_url

    return request.app.state.trainings.submit(config, destination, webhook=None, webhook_events_filter=None,
                                              base_url=base_url(request))


def cancel_training(request: Request, account: str, training_id: str) -> None:
    request.app.state.trainings.cancel(training_id)


def training_events(request: Request) -> Any:
    """The server's training events (:class:`~finetune.queue.events.TrainingEvents`), or None without a queue."""
    trainings = getattr(request.app.state, "trainings", None)
    return getattr(trainings, "events", None)


def queue_position(request: Request, training_id: str) -> int | None:
    """The training's 0-based place among the waiting ones of this server's queue; None when not waiting."""
    queue = getattr(getattr(request.app.state, "trainings", None), "queue", None)
    return queue.position(training_id) if queue is not None else None


# ---------------------------------------------------------------- predictions (the inference service)
def _predictions(request: Request) -> Any:
    service = getattr(request.app.state, "predictions", None)
    if service is None:
        raise UsageError("this server runs no inference workers", "start it with `finetune serve`")
    return service


def create_prediction(request: Request, account: str, version: Version, inputs: dict[str, Any]) -> str:
    """Create a streaming prediction of ``version`` as ``POST /v1/predictions`` does; its id. Blocks until a
    worker admitted it (call from a thread)."""
    from ..server.context import base_url

    record = _predictions(request).create(version, inputs, owner=account, stream=True, base_url=base_url(request))
    return record.id


def prediction(request: Request, account: str, prediction_id: str) -> Any:
    """The prediction's record as ``GET /v1/predictions/{id}`` reads it; 404 for another account's (the access
    rule)."""
    from ..registry.predictions import PredictionNotFoundError
    from ..server import access

    try:
        record = _predictions(request).get(prediction_id)
    except (PredictionNotFoundError, UsageError):
        raise PredictionNotFoundError(f"prediction {prediction_id} not found") from None
    access.check_owns(account, record, "prediction", prediction_id, error=PredictionNotFoundError)
    return record


def cancel_prediction(request: Request, account: str, prediction_id: str) -> Any:
    """Stop a prediction as ``POST /v1/predictions/{id}/cancel`` does (blocks a step or two: call from a
    thread); its record."""
    prediction(request, account, prediction_id)
    return _predictions(request).cancel(prediction_id)


async def stream_prediction(request: Request, account: str, prediction_id: str) -> AsyncIterator[tuple[str, str]]:
    """The prediction's events as the API streams them: ``("output", piece)``..., ``("logs", line)`` as the
    worker reports (loading the version; the lines before the stream began come first), then ``("done", json)``
    or ``("error", text)``; 404 for another account's prediction (the access rule)."""
    service = _predictions(request)
    record = prediction(request, account, prediction_id)
    for line in (record.logs or "").splitlines():  # what the worker said before this stream began (loading)
        yield "logs", line
    async for event, data in service.subscribe(prediction_id):
        yield event, data


# ---------------------------------------------------------------- comparisons (run by the inference workers)
def start_comparison(request: Request, account: str, model: str, versions: list[Version], prompts: list[str],
                     eval_file: str | None, form: dict[str, Any]) -> Any:
    """Hand a comparison to the inference workers (bounded; 429 while one of the account's runs); its job, which
    keeps ``form`` for the result page."""
    return _predictions(request).comparisons.start(account, model, versions, prompts, eval_file, form)


def comparison(request: Request, account: str, job_id: str) -> Any:
    """A comparison ``account`` started (anyone else's is not found)."""
    return _predictions(request).comparisons.get(job_id, account)
