"""Pages that follow something running: a training (status, loss chart, log, cancel) and the playground
(a prediction whose output streams in).

The training page polls ``/trainings/{id}/live`` once a second for what changed (status, progress, the chart
redrawn from ``metrics.jsonl``, the log from the byte offset the page has); the playground creates a prediction
through the predictions service and reads its output as server-sent events.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse

from ..errors import FinetuneError, TrainingNotFoundError, UsageError
from ..registry.jobs import Trainings
from ..server import access
from . import services
from .charts import loss_chart_svg
from .core import WebUser, render, router
from .pages import Form, User, registry
from .views import training_view

LOG_CHUNK = 64 * 1024  # bytes of log sent at once (the first paint shows the last LOG_CHUNK)


def _record(request: Request, user: WebUser, training_id: str) -> Any:
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
    record = _record(request, user, training_id)
    rows = _metrics(request, training_id)
    log, offset = _log(request, training_id, None)
    view = training_view(record, rows)
    can_cancel = access.owner_of(record) == user.account
    return render(request, "training.html", {"title": f"Training {training_id}", "t": view, "chart": _chart(rows),
                                             "log": log, "log_offset": offset, "can_cancel": can_cancel}, user=user)


def _chart(rows: list[dict[str, Any]]) -> Any:
    from markupsafe import Markup

    return Markup(loss_chart_svg(rows))  # numbers and fixed labels only (see charts.py)


@router.get("/trainings/{training_id}/live")
def training_live(request: Request, user: User, training_id: str, log_offset: int = 0) -> Response:
    """What changed since the page's last look: JSON for app.js."""
    record = _record(request, user, training_id)
    rows = _metrics(request, training_id)
    log, offset = _log(request, training_id, log_offset)
    view = training_view(record, rows)
    version_url = None
    if view["version_number"]:
        version_url = f"/models/{record.destination}/versions/{view['version_number']}"
    return JSONResponse({**{k: view[k] for k in ("status", "final", "progress", "tokens_per_s", "eta", "duration",
                                                 "error", "version", "points", "where")},
                         "version_url": version_url, "chart": str(_chart(rows)), "log": log, "log_offset": offset},
                        headers={"Cache-Control": "no-store"})


@router.post("/trainings/{training_id}/cancel")
def cancel_training(request: Request, user: User, form: Form, training_id: str) -> Response:
    _record(request, user, training_id)
    services.cancel_training(request, user.account, training_id)
    return RedirectResponse(f"/trainings/{training_id}", status_code=303)


# ---------------------------------------------------------------- playground
@router.get("/models/{owner}/{name}/playground")
def playground_tab(request: Request, user: User, owner: str, name: str) -> Response:
    from .pages import model_context

    ctx = model_context(request, user, f"{owner}/{name}", "playground")
    ctx["versions"] = registry(request).list_versions(ctx["model"]["model"])
    return render(request, "tab_playground.html", ctx, user=user)


def _number(form: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    text = str(form.get(key) or "").strip()
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        raise UsageError(f"{key.replace('_', ' ')}: expected {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}") from None


@router.post("/models/{owner}/{name}/playground")
def playground_run(request: Request, user: User, form: Form, owner: str, name: str) -> Response:
    """Create a prediction of the chosen version; the page then streams its output."""
    reg = registry(request)
    version = access.visible_version(reg, user.account, f"{owner}/{name}", str(form.get("version") or "latest"))
    prompt = str(form.get("prompt") or "")
    if not prompt.strip():
        raise UsageError("prompt: enter a prompt")
    inputs = {"prompt": prompt, "max_new_tokens": _number(form, "max_new_tokens", int, 64),
              "temperature": _number(form, "temperature", float, 0.0), "seed": _number(form, "seed", int, 0)}
    prediction_id = services.create_prediction(request, user.account, version, inputs)
    return JSONResponse({"id": prediction_id, "stream_url": f"/predictions/{prediction_id}/stream"}, status_code=201)


@router.get("/predictions/{prediction_id}/stream")
async def prediction_stream(request: Request, user: User, prediction_id: str) -> Response:
    """The prediction's output as server-sent events for the playground: ``output`` events (each a JSON
    string), then ``done`` (JSON) or ``error`` (a JSON string)."""
    events = services.stream_prediction(request, user.account, prediction_id)
    first = await anext(events, None)  # an unknown or foreign prediction fails here, as a 404 page

    async def body():
        event = first
        try:
            while event is not None:
                kind, data = event
                payload = data if kind == "done" else json.dumps(data)
                yield f"event: {kind}\ndata: {payload}\n\n"
                event = await anext(events, None)
        except FinetuneError as err:
            yield f"event: error\ndata: {json.dumps(str(err))}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
