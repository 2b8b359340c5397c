"""The training page: status, place in the queue, loss chart, log, what it trains, cancel, train again.

The page asks ``/trainings/{id}/live`` for what changed (status, progress, the chart redrawn from
``metrics.jsonl``, the log from the byte offset the page has). Given the ``since`` of its last answer, the request
waits (up to :data:`LIVE_WAIT_S`, holding no thread) for the training's next event on the server's training events
(:mod:`finetune.queue.events`) before it reads the files, and the page asks again at once: it hears of a step
when it happens, and nothing is read while nothing changes. The playground is in :mod:`.playground`.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, Response

from ..errors import FinetuneError, TrainingNotFoundError, UsageError
from ..registry.jobs import FINAL, Trainings
from ..server import access
from . import services
from .charts import loss_chart_svg
from .core import WebUser, render, router
from .pages import Form, User, registry
from .start_points import receives_trainings, training_facts
from .views import training_view

LOG_CHUNK = 64 * 1024  # bytes of log sent at once (the first paint shows the last LOG_CHUNK)
LIVE_WAIT_S = 10.0  # how long a live request waits for the training's next event before it answers anyway


def owned_training(request: Request, user: WebUser, training_id: str) -> Any:
    """The training if the user owns it; 404 otherwise (the access rule for trainings)."""
    try:
        record = Trainings(registry(request)).get(training_id)
    except (TrainingNotFoundError, UsageError):
        raise TrainingNotFoundError(f"training {training_id} not found") from None
    access.check_owns(user.account, record, "training", training_id)
    return record


def _metrics(request: Request, training_id: str) -> list[dict[str, Any]]:
    from ..training.metrics import MetricsLog

    return MetricsLog(registry(request).training_paths(training_id).metrics).read()


def _log(request: Request, training_id: str, offset: int | None) -> tuple[str, int]:
    """Log text from byte ``offset`` (None: the last LOG_CHUNK bytes) and the offset to ask from next time."""
    path = registry(request).training_paths(training_id).log
    try:
        with open(path, "rb") as f:
            end = f.seek(0, 2)
            start = max(0, end - LOG_CHUNK) if offset is None else min(max(offset, 0), end)
            f.seek(start)
            data = f.read(LOG_CHUNK)
    except FileNotFoundError:
        return "", 0
    cut = data.rfind(b"\n") + 1 if start + len(data) < end or not data.endswith(b"\n") else len(data)
    data = data[:cut]  # whole lines only; the rest comes next time
    return data.decode("utf-8", errors="replace"), start + len(data)


@router.get("/trainings/{training_id}")
def training_page(request: Request, user: User, training_id: str) -> Response:
    record = owned_training(request, user, training_id)
    rows = _metrics(request, training_id)
    log, offset = _log(request, training_id, None)
    view = training_view(record, rows, services.queue_position(request, training_id))
    can_cancel = access.owner_of(record) == user.account
    reg = registry(request)
    again = None
    try:
        if receives_trainings(reg, user.account, reg.get_model(record.destination)):
            again = f"/models/{record.destination}/train?again={record.id}"
    except FinetuneError:
        again = None  # the destination is gone
    return render(request, "training.html", {"title": f"Training {training_id}", "t": view, "chart": _chart(rows),
                                             "log": log, "log_offset": offset, "can_cancel": can_cancel,
                                             "facts": training_facts(reg, record), "again_url": again}, user=user)


def _chart(rows: list[dict[str, Any]]) -> Any:
    from markupsafe import Markup

    return Markup(loss_chart_svg(rows))  # numbers and fixed labels only (see charts.py)


@router.get("/trainings/{training_id}/live")
async def training_live(request: Request, user: User, training_id: str, log_offset: int = 0,
                        since: int | None = None) -> Response:
    """What changed since the page's last look: JSON for app.js. With ``since`` (the ``seq`` of the last answer),
    it first waits for the training's next event, or :data:`LIVE_WAIT_S`."""
    record = await run_in_threadpool(owned_training, request, user, training_id)
    events = services.training_events(request)
    seq = None  # no training events (a web app without the API's queue): the page asks again after a second
    if events is not None:
        if since is not None and record.status not in FINAL:
            seq = await events.wait_async(training_id, since, LIVE_WAIT_S)
        else:
            seq = events.seq(training_id)
    return await run_in_threadpool(_live, request, training_id, log_offset, seq)


def _live(request: Request, training_id: str, log_offset: int, seq: int | None) -> Response:
    record = Trainings(registry(request)).get(training_id)
    rows = _metrics(request, training_id)
    log, offset = _log(request, training_id, log_offset)
    view = training_view(record, rows, services.queue_position(request, training_id))
    version_url = None
    if view["version_number"]:
        version_url = f"/models/{record.destination}/versions/{view['version_number']}"
    return JSONResponse({**{k: view[k] for k in ("status", "final", "progress", "tokens_per_s", "eta", "duration",
                                                 "error", "version", "points", "where")},
                         "version_url": version_url, "chart": str(_chart(rows)), "log": log, "log_offset": offset,
                         "seq": seq},
                        headers={"Cache-Control": "no-store"})


@router.post("/trainings/{training_id}/cancel")
def cancel_training(request: Request, user: User, form: Form, training_id: str) -> Response:
    owned_training(request, user, training_id)
    services.cancel_training(request, user.account, training_id)
    return RedirectResponse(f"/trainings/{training_id}", status_code=303)
