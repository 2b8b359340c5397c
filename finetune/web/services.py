"""The web app's calls into the service: uploads, trainings, predictions.

Each function hands over to what the HTTP API uses for the same action, so that a file uploaded, a training
started or a prediction run from a page is the same object, checked by the same rules, as one made with the API.
This module only adapts arguments; it holds no rule of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import Request

from ..config import Config
from ..errors import FinetuneError
from ..registry import Registry, Version


def _registry(request: Request) -> Registry:
    return request.app.state.registry


# ---------------------------------------------------------------- files (the API's file store)
class FileInfo:
    def __init__(self, id: str, name: str, size: int):
        self.id, self.name, self.size = id, name, size


def list_files(request: Request, account: str) -> list[FileInfo]:
    """The account's uploaded files, newest first."""
    from ..registry.files import Files

    return [FileInfo(f.id, f.name, f.size) for f in Files(_registry(request)).list(owner=account)]


async def store(request: Request, account: str, upload: Any) -> FileInfo:
    """Store an uploaded file for ``account`` with the API's size limit."""
    from ..registry.files import Files

    limit = request.app.state.settings.max_upload_bytes
    record = Files(_registry(request)).create(account, upload.filename, upload.file, max_bytes=limit)
    return FileInfo(record.id, record.name, record.size)


def path_of(request: Request, account: str, file_id: str) -> Path:
    """Where an uploaded file of ``account`` lies (404 for someone else's)."""
    from ..registry.files import Files

    return Files(_registry(request)).path(file_id, owner=account)


# ---------------------------------------------------------------- trainings (the queue)
def start_training(request: Request, account: str, config: Config) -> Any:
    """Submit a checked config into its destination and queue it, as ``POST .../trainings`` does."""
    from ..training.run import submit_training

    record = submit_training(config, registry=_registry(request), destination=config.destination, source="api")
    queue = getattr(request.app.state, "queue", None)
    if queue is not None:
        queue.submit(record.id)
    return record


def cancel_training(request: Request, account: str, training_id: str) -> None:
    queue = getattr(request.app.state, "queue", None)
    if queue is not None:
        queue.cancel(training_id)
        return
    from ..registry.jobs import Trainings

    Trainings(_registry(request)).request_cancel(training_id)


# ---------------------------------------------------------------- predictions (the inference service)
def create_prediction(request: Request, account: str, version: Version, inputs: dict[str, Any]) -> str:
    """Create a streaming prediction of ``version``; its id."""
    raise FinetuneError("predictions are not available in this server yet")


def stream_prediction(request: Request, account: str, prediction_id: str) -> Iterator[tuple[str, Any]]:
    """``("output", text)`` pieces as they are generated, then ``("done", {"status": ...})``."""
    raise FinetuneError("predictions are not available in this server yet")
