"""``/v1/predictions``: run a version on an input, as Replicate's API does (create, get, list, cancel, stream).

The work happens in :class:`finetune.serving.service.PredictionService` (``app.state.predictions``); these
handlers parse, check access (:mod:`..access`) and shape the answer (:func:`prediction_object`).

``Prefer: wait`` (60 s) or ``Prefer: wait=N`` holds the create request until the prediction ends or N seconds
pass, awaited on the event loop: an open wait holds no thread of the server's pool, which reads need. A
prediction still running then (or any prediction created without ``Prefer: wait``) is answered with status
``starting`` and no output yet, as Replicate does: its client treats any other status in a blocking answer as
final, polls only after ``starting``, and its poller never yields output that was in that first answer.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from ...errors import UsageError, VersionNotFoundError
from ...registry import Version
from ...registry.jobs import FINAL
from ...registry.predictions import PredictionNotFoundError, PredictionRecord
from ...serving.inputs import WebhookOptions
from .. import access
from ..auth import AccountDep, current_account
from ..context import RegistryDep, SettingsDep, VersionIndexDep, base_url, webhook_policy
from ..pagination import page
from ..webhooks import check_webhook

router = APIRouter(prefix="/v1", dependencies=[Depends(current_account)], tags=["predictions"])

MAX_WAIT_S = 60
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait(?:\s*=\s*(\d+))?(?:$|[,;\s])")


class ModelPredictionCreate(WebhookOptions):
    """The body of ``POST /v1/models/{owner}/{name}/predictions`` (Replicate's fields). ``input`` is checked
    against the version's own input model (:mod:`finetune.serving.inputs`) once the version is known."""

    input: dict[str, Any]
    stream: bool | None = None


class PredictionCreate(ModelPredictionCreate):
    """The body of ``POST /v1/predictions``: as above, with the version."""

    version: str


def prediction_object(record: PredictionRecord, url: str) -> dict[str, Any]:
    """A prediction as ``GET /v1/predictions/{id}`` returns it (Replicate's fields, ``version_ref`` ours)."""
    links = f"{url}/v1/predictions/{record.id}"
    return {
        "id": record.id,
        "model": record.model,
        "version": record.version,
        "input": record.input,
        "output": record.output,
        "logs": record.logs,
        "error": record.error,
        "status": str(record.status),
        "created_at": record.created_at,
        "started_at": record.started_at,
        "completed_at": record.completed_at,
        "urls": {"get": links, "cancel": f"{links}/cancel", "stream": f"{links}/stream"},
        "metrics": record.metrics,
        "data_removed": False,
        "source": record.source,
        # ours
        "version_ref": record.version_ref,
        "placement": record.placement,
    }


def _service(request: Request) -> Any:
    service = getattr(request.app.state, "predictions", None)
    if service is None:
        raise UsageError("this server runs no inference workers", "start it with `finetune serve`")
    return service


def _wait_seconds(request: Request) -> float | None:
    """Seconds ``Prefer: wait[=N]`` asks to hold the request (at most 60), or None."""
    prefer = request.headers.get("prefer")
    if not prefer:
        return None
    match = _PREFER_WAIT.search(prefer.strip().lower())
    if match is None:
        return None
    seconds = int(match.group(1)) if match.group(1) else MAX_WAIT_S
    return float(max(1, min(MAX_WAIT_S, seconds)))


def find_version(reg: Any, account: Any, index: Any, ref: str) -> Version:
    """The version a prediction names: a 64-hex id (any model the caller may see) or ``owner/name:SELECTOR``."""
    if not isinstance(ref, str) or not ref:
        raise UsageError("version: expected a version id or owner/name:ID")
    if "/" in ref:
        model, sep, selector = ref.partition(":")
        if not sep or not selector:
            raise UsageError(f"version {ref!r}: expected owner/name:ID",
                             "or POST /v1/models/{owner}/{name}/predictions for the latest version")
        return access.visible_version(reg, account, model, selector, index)
    return access.visible_version_by_id(reg, account, ref, index)  # another's private version: 404 alike


async def _create(request: Request, account: Any, version: Version, body: Any) -> JSONResponse:
    service = _service(request)
    url = base_url(request)
    webhook = body.webhook or body.webhook_completed
    events = body.webhook_events_filter
    if body.webhook_completed and not body.webhook:
        events = ["completed"]
    check_webhook(webhook, events, webhook_policy(request))
    record = await service.create_async(version, body.input, owner=access.username(account),
                                        stream=bool(body.stream), webhook=webhook, webhook_events_filter=events,
                                        base_url=url)
    wait = _wait_seconds(request)
    if wait is not None:
        record = await service.wait_async(record.id, wait)
    # Without Prefer: wait the answer is "starting" even when the prediction already ended (a short one can end
    # before the answer goes out): the client then polls, where a final answer would make its poller count the
    # whole output as already seen and yield none of it.
    if wait is None or record.status not in FINAL:
        # Answered as Replicate answers a new prediction (see the module docstring): starting, no output yet.
        # The client's poller treats output in this answer as already seen and yields only what comes after,
        # so pieces generated before the answer went out would be lost to it. The record is a copy.
        record.status, record.output = "starting", None
    headers = {"Location": f"{url}/v1/predictions/{record.id}"}
    return JSONResponse(prediction_object(record, url), status_code=201, headers=headers)


@router.post("/predictions", status_code=201)
async def create_prediction(body: PredictionCreate, request: Request, account: AccountDep, reg: RegistryDep,
                            index: VersionIndexDep) -> JSONResponse:
    """Run a version (``version``: its 64-hex id or ``owner/name:ID``) on ``input``."""
    version = await run_in_threadpool(find_version, reg, account, index, body.version)
    return await _create(request, account, version, body)


@router.post("/models/{owner}/{name}/predictions", status_code=201)
async def create_model_prediction(owner: str, name: str, body: ModelPredictionCreate, request: Request,
                                  account: AccountDep, reg: RegistryDep) -> JSONResponse:
    """Run a model's latest version on ``input``."""
    model = access.visible_model(reg, account, f"{owner}/{name}")
    version = reg.latest(model.full_name)
    if version is None:
        raise VersionNotFoundError(f"model {model.full_name} has no versions yet", "train one into it first")
    return await _create(request, account, version, body)


def _owned(request: Request, account: Any, prediction_id: str) -> PredictionRecord:
    try:
        record: PredictionRecord = _service(request).get(prediction_id)
    except (PredictionNotFoundError, UsageError):  # UsageError: an id that cannot name a record
        raise PredictionNotFoundError(f"prediction {prediction_id} not found") from None
    access.check_owns(account, record, "prediction", prediction_id, error=PredictionNotFoundError)
    return record


@router.get("/predictions")
def list_predictions(request: Request, account: AccountDep, settings: SettingsDep) -> dict[str, Any]:
    """The caller's predictions, newest first, paginated."""
    service = _service(request)
    url = base_url(request)

    def load(prediction_id: str) -> dict[str, Any] | None:
        try:
            return prediction_object(service.get(prediction_id), url)
        except PredictionNotFoundError:
            return None

    return page(request, service.list_ids(owner=access.username(account)), load, descending=True,
                page_size=settings.page_size)


@router.get("/predictions/{prediction_id}")
def get_prediction(prediction_id: str, request: Request, account: AccountDep) -> dict[str, Any]:
    return prediction_object(_owned(request, account, prediction_id), base_url(request))


@router.post("/predictions/{prediction_id}/cancel")
async def cancel_prediction(prediction_id: str, request: Request, account: AccountDep) -> dict[str, Any]:
    """Stop a prediction (within a decoding step); an ended one is returned as it is."""
    _owned(request, account, prediction_id)
    record = await _service(request).cancel_async(prediction_id)
    return prediction_object(record, base_url(request))


@router.get("/predictions/{prediction_id}/stream")
async def stream_prediction(prediction_id: str, request: Request, account: AccountDep) -> StreamingResponse:
    """Server-Sent Events as Replicate sends them: ``output`` events with text pieces, then ``done`` (or
    ``error``). A client that disconnects before the end cancels the prediction."""
    _owned(request, account, prediction_id)
    events = _service(request).subscribe(prediction_id)

    async def body() -> Any:
        n = 0
        async for event, data in events:
            if event == "logs":
                continue  # Replicate sends logs events only when asked; the client ignores them anyway
            n += 1
            lines = "".join(f"data: {line}\n" for line in data.split("\n"))
            yield f"event: {event}\nid: {n}\n{lines}\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
