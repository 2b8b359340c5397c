"""The playground: run a version on a prompt (or, for versions trained on chat data, a conversation with a system
prompt) and watch the output stream in, with Stop, the loading state of a cold start, and the token count and
speed when it ends.

A run creates a prediction through the predictions service (the API's ``POST /v1/predictions``); its input is
checked by the version's own input model (:func:`finetune.serving.schema.check_input`), whose problems come
back by field (:attr:`~finetune.errors.InputError.fields`), each shown at its own. The output arrives as
server-sent events: ``output`` pieces, ``logs`` lines (the worker loading the version), then ``done`` with the
prediction's metrics, or ``error``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import FinetuneError, InputError, UsageError
from ..server import access
from ..serving.schema import check_input, prompt_format
from . import services
from .core import render, router
from .pages import Form, User, model_context, registry

# The form's number fields: (type, default, label); the defaults are the page's, the ranges the schema's
NUMBERS = {"max_new_tokens": (int, 64, "Max new tokens"), "temperature": (float, 0.0, "Temperature"),
           "seed": (int, 0, "Seed")}


def is_chat(version: Any) -> bool:
    """Whether a version was trained on chat data (it takes turns and a system prompt)."""
    return prompt_format(version.metadata) == "messages"


@router.get("/models/{owner}/{name}/playground")
def playground_tab(request: Request, user: User, owner: str, name: str) -> Response:
    ctx = model_context(request, user, f"{owner}/{name}", "playground")
    ctx["versions"] = [{"number": v.number, "id": v.id, "chat": is_chat(v), "kind": v.kind}
                       for v in registry(request).list_versions(ctx["model"]["model"])]
    ctx["defaults"] = {key: f"{default:g}" for key, (_, default, _) in NUMBERS.items()}
    return render(request, "tab_playground.html", ctx, user=user)


def _field_of(field: str) -> str:
    """The form field an input problem is about: turns (``messages``, ``messages[3]``) are typed in the prompt
    box."""
    return "prompt" if field.startswith("messages") else field


def playground_input(form: dict[str, Any], fmt: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The prediction input a submitted playground form stands for, and every problem by field."""
    errors: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for key, (kind, default, label) in NUMBERS.items():
        text = str(form.get(key) or "").strip()
        try:
            inputs[key] = kind(text) if text else default
        except ValueError:
            errors[key] = [f"{label}: expected {'an integer' if kind is int else 'a number'}, got {text!r}"]
    prompt = str(form.get("prompt") or "")
    if not prompt.strip():
        errors["prompt"] = ["enter a prompt" if fmt != "messages" else "enter a message"]
    chat = fmt == "messages"
    if chat:
        try:
            history = json.loads(str(form.get("history") or "[]"))
        except json.JSONDecodeError:
            history = None
        if not isinstance(history, list):
            errors.setdefault("prompt", []).append("the conversation so far could not be read; start a new one")
            history = []
        inputs["messages"] = [*history, {"role": "user", "content": prompt}]
        system = str(form.get("system_prompt") or "").strip()
        if system:
            inputs["system_prompt"] = system
    else:
        inputs["prompt"] = prompt
    # The version's own check, over every field the form could read (a valid prompt in place of a blank one)
    probe = {k: v for k, v in inputs.items() if k not in errors}
    if "prompt" in errors:
        probe.update({"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"})
    try:
        check_input(fmt, probe)
    except InputError as err:
        said = set(errors)
        for problem in err.fields:
            key = _field_of(problem["field"])
            if key not in said:
                errors.setdefault(key, []).append(f"input.{problem['field']}: {problem['message']}")
    return inputs, errors


@router.post("/models/{owner}/{name}/playground")
async def playground_run(request: Request, user: User, form: Form, owner: str, name: str) -> Response:
    """Create a prediction of the chosen version (201 with its stream's URL), or 422 with every problem by field."""
    reg = registry(request)
    try:
        version = access.visible_version(reg, user.account, f"{owner}/{name}", str(form.get("version") or "latest"))
    except FinetuneError as err:
        return _refused({"version": [err.message]})
    inputs, errors = playground_input(form, prompt_format(version.metadata))
    if errors:
        return _refused(errors)
    try:
        prediction_id = await run_in_threadpool(services.create_prediction, request, user.account, version, inputs)
    except InputError as err:  # the service's own checks: a prompt over the server's limits
        return _refused({_field_of(p["field"]): [f"input.{p['field']}: {p['message']}"] for p in err.fields})
    except UsageError as err:  # the worker's: a prompt longer than the model's context
        return _refused({"prompt": [err.message]})
    return JSONResponse({"id": prediction_id, "stream_url": f"/predictions/{prediction_id}/stream",
                         "cancel_url": f"/predictions/{prediction_id}/cancel", "chat": is_chat(version)},
                        status_code=201)


def _refused(errors: dict[str, list[str]]) -> JSONResponse:
    detail = "; ".join(m for messages in errors.values() for m in messages)
    return JSONResponse({"title": "Not run", "detail": detail, "status": 422, "errors": errors}, status_code=422,
                        media_type="application/problem+json")


@router.post("/predictions/{prediction_id}/cancel")
async def prediction_cancel(request: Request, user: User, form: Form, prediction_id: str) -> Response:
    """Stop a running prediction (the playground's Stop button)."""
    record = await run_in_threadpool(services.cancel_prediction, request, user.account, prediction_id)
    return JSONResponse({"id": prediction_id, "status": str(record.status)})


def _done_payload(request: Request, account: str, prediction_id: str, data: str) -> str:
    """The ``done`` event's JSON with the prediction's token count and speed, for the page's summary line."""
    try:
        info = json.loads(data) if data else {}
    except json.JSONDecodeError:
        info = {}
    try:
        metrics = services.prediction(request, account, prediction_id).metrics or {}
    except FinetuneError:
        metrics = {}
    keys = ("output_token_count", "tokens_per_second", "predict_time", "time_to_first_token")
    return json.dumps({**info, "metrics": {k: metrics[k] for k in keys if k in metrics}})


@router.get("/predictions/{prediction_id}/stream")
async def prediction_stream(request: Request, user: User, prediction_id: str) -> Response:
    """The prediction's output as server-sent events for the playground: ``output`` events (each a JSON
    string), ``logs`` (JSON strings), then ``done`` (JSON, with metrics) or ``error`` (a JSON string)."""
    events = services.stream_prediction(request, user.account, prediction_id)
    first = await anext(events, None)  # an unknown or foreign prediction fails here, as a 404 page

    async def body():
        event = first
        try:
            while event is not None:
                kind, data = event
                if kind == "done":
                    payload = await run_in_threadpool(_done_payload, request, user.account, prediction_id, data)
                else:
                    payload = json.dumps(data)
                yield f"event: {kind}\ndata: {payload}\n\n"
                event = await anext(events, None)
        except FinetuneError as err:
            yield f"event: error\ndata: {json.dumps(str(err))}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
