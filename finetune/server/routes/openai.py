"""``/openai/v1``: the OpenAI API over the same predictions as ``/v1/predictions`` (models, chat, completions).

A thin adapter: each request names a version as its ``model`` (``owner/name:N``, or ``owner/name`` for the
latest), becomes a prediction input (:mod:`..openai_schema`), and runs through the prediction service
(``app.state.predictions``) with the caller's token, access rules, limits and workers, exactly as a Replicate-style
prediction does; the prediction is recorded and listed under ``/v1/predictions`` like any other (its id is the
completion's id after the ``chatcmpl-``/``cmpl-`` prefix). Streaming answers Server-Sent Events of
``chat.completion.chunk`` (or ``text_completion``) objects, then ``data: [DONE]``.

Every error, from the token check to the worker's, is answered in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``, 400 rather than our 422 for bad input) by
:class:`OpenAIRoute`, so the official ``openai`` client raises its own exception classes.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ...errors import FinetuneError, InputError, IntegrityError, NotFoundError, UsageError, VersionNotFoundError
from ...registry import Version
from ...registry.jobs import FINAL
from ...serving.schema import prompt_format
from .. import access
from ..auth import AccountDep, current_account
from ..context import RegistryDep, VersionIndexDep, base_url
from ..openai_schema import ChatRequest, CompletionRequest, OpenAIError, error_body
from ..problems import status_for

log = logging.getLogger("finetune.server")
_CODES = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded", 503: "service_unavailable"}


def openai_error(err: Exception, body: Any = None) -> OpenAIError:
    """Any error of a request as OpenAI answers it; ``body`` (the parsed request) names the parameter at fault."""
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, RequestValidationError):
        errors = err.errors() or [{}]
        first = errors[0]
        # a value that fits no member of a union fails once per member (loc ends in "str", "list[...]"): name
        # the parameter all the failures share
        loc = [p for p in first.get("loc", ()) if p != "body"]
        for other in errors[1:]:
            other_loc = [p for p in other.get("loc", ()) if p != "body"]
            while loc and other_loc[:len(loc)] != loc:
                loc.pop()
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
        if first.get("type") == "json_invalid":
            return OpenAIError(400, "the request body is not valid JSON")
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return OpenAIError(400, f"{param}: {message}" if param else message, param=param)
    if isinstance(err, HTTPException):
        return OpenAIError(err.status_code, str(err.detail))
    if isinstance(err, FinetuneError):
        status = status_for(err)
        status = 400 if status == 422 else 503 if status == 409 else status  # 409: the worker did not take it
        if isinstance(err, InputError) and err.fields and body is not None:  # named as the caller named it
            first = err.fields[0]  # (max_new_tokens -> max_tokens); OpenAI's shape has one param
            param = body.param_of(first["field"])
            return OpenAIError(status, f"{param}: {first['message']}", param=param)
        return OpenAIError(status, str(err), code=_CODES.get(status))
    log.exception("an OpenAI API request failed")
    return OpenAIError(500, f"internal error ({type(err).__name__}); the server log has the details")


class OpenAIRoute(APIRoute):
    """A route whose every error, raised by the handler, its dependencies or its body's validation, is answered
    in OpenAI's error shape rather than the problem+json of ``/v1``."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as err:
                error = openai_error(err)
                headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                return JSONResponse(error_body(error), status_code=error.status, headers=headers)

        return route


router = APIRouter(prefix="/openai/v1", dependencies=[Depends(current_account)], tags=["openai"],
                   route_class=OpenAIRoute)


def _timestamp(iso: str) -> int:
    try:
        return int(dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except (ValueError, AttributeError):
        return 0


def _model_object(model_id: str, version: Version) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": _timestamp(version.created_at),
            "owned_by": version.model.split("/", 1)[0]}


def find_model(reg: Any, account: Any, index: Any, model: str) -> Version:
    """The version ``model`` names (``owner/name:N``, any selector, or ``owner/name`` for the latest) if the caller
    may use it; 404 ``model_not_found`` otherwise (another account's private version answers as a missing one)."""
    name, sep, selector = model.partition(":")
    try:
        if sep:
            return access.visible_version(reg, account, name, selector, index)
        version: Version | None = reg.latest(access.visible_model(reg, account, name).full_name)
        if version is None:
            raise VersionNotFoundError(f"model {name} has no versions")
        return version
    except (NotFoundError, UsageError):
        raise OpenAIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                          param="model", code="model_not_found") from None


@router.get("/models")
def list_models(account: AccountDep, reg: RegistryDep) -> dict[str, Any]:
    """The versions the caller may use: each ``owner/name:N``, and ``owner/name`` for the latest."""
    data = []
    for model in access.visible_models(reg, account):
        listed = []
        for version in reg.list_versions(model.full_name):  # newest first
            try:
                listed.append(_model_object(version.ref, version))
            except (IntegrityError, FileNotFoundError):  # damaged, or deleted meanwhile: left out, as /v1 does
                continue
        if listed:
            data.append({**listed[0], "id": model.full_name})
        data += listed
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
def retrieve_model(model: str, account: AccountDep, reg: RegistryDep, index: VersionIndexDep) -> dict[str, Any]:
    return _model_object(model, find_model(reg, account, index, model))


async def _predict(request: Request, account: Any, reg: Any, index: Any, body: Any) -> tuple[Any, Version]:
    """The prediction for ``body``, created and admitted by the prediction service (checks, limits, worker)."""
    version = await run_in_threadpool(find_model, reg, account, index, body.model)
    service = request.app.state.predictions
    try:
        data = body.prediction_input(prompt_format(version.metadata))
        record = await service.create_async(version, data, owner=access.username(account), stream=bool(body.stream),
                                            base_url=base_url(request))
    except FinetuneError as err:
        raise openai_error(err, body) from None
    return record, version


def _usage(record: Any) -> dict[str, int]:
    prompt, completion = (int(record.metrics.get(k) or 0) for k in ("input_token_count", "output_token_count"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(record: Any, body: Any) -> str:
    """``length`` when the version generated all the tokens it could (the request's, or what the model's context
    left), else ``stop`` (an end of text or a stop sequence): the engine says which."""
    reason = record.metrics.get("finish_reason")
    if reason in ("length", "stop"):
        return str(reason)
    return "length" if int(record.metrics.get("output_token_count") or 0) >= body.max_new_tokens() else "stop"


def _ended_badly(record: Any) -> OpenAIError | None:
    if record.status == "failed":
        return OpenAIError(500, record.error or "the prediction failed")
    if record.status == "canceled":
        return OpenAIError(500, f"the prediction {record.id} was canceled")
    return None


async def _until_done(request: Request, record: Any) -> Any:
    """The prediction once it ended; canceled if the client goes away first (nobody would read its output)."""
    service = request.app.state.predictions
    while record.status not in FINAL:
        record = await service.wait_async(record.id, 1.0)
        if record.status not in FINAL and await request.is_disconnected():
            return await service.cancel_async(record.id)
    return record


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _stream(request: Request, record: Any, body: Any,
            chunk: Callable[[str | None, str | None], dict[str, Any]]) -> Response:
    """Server-Sent Events: a chunk per output piece, a last one with the finish reason (and usage when
    ``stream_options.include_usage``), then ``[DONE]``. A client that goes away cancels the prediction."""
    service = request.app.state.predictions

    async def events() -> AsyncIterator[str]:
        async for event, text in service.subscribe(record.id):  # output pieces, then done or error
            if event == "output":
                yield _sse(chunk(text, None))
        final = service.get(record.id)
        bad = _ended_badly(final)
        if bad is not None:
            yield _sse(error_body(bad))
            return
        last = chunk(None, _finish_reason(final, body))
        yield _sse(last)
        if body.include_usage:
            yield _sse({**last, "choices": [], "usage": _usage(final)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request, account: AccountDep, reg: RegistryDep,
                           index: VersionIndexDep) -> Response:
    """Chat with a version: the messages rendered with its chat template (or, for a version trained on
    prompt/completion data, one user message as its prompt)."""
    record, version = await _predict(request, account, reg, index, body)
    common = {"id": f"chatcmpl-{record.id}", "created": int(time.time()), "model": version.ref,
              "system_fingerprint": None}
    if body.stream:
        first = [True]

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first[0]:
                delta, first[0] = {"role": "assistant", **delta}, False
            extra = {"usage": None} if body.include_usage else {}
            return {**common, "object": "chat.completion.chunk", **extra,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        return _stream(request, record, body, chunk)
    record = await _until_done(request, record)
    if (bad := _ended_badly(record)) is not None:
        raise bad
    message = {"role": "assistant", "content": "".join(record.output or []), "refusal": None}
    return JSONResponse({**common, "object": "chat.completion", "usage": _usage(record), "choices": [
        {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(record, body)}]})


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, account: AccountDep, reg: RegistryDep,
                      index: VersionIndexDep) -> Response:
    """Continue a prompt, taken as it is (the version's training format is not applied)."""
    record, version = await _predict(request, account, reg, index, body)
    common = {"id": f"cmpl-{record.id}", "object": "text_completion", "created": int(time.time()),
              "model": version.ref, "system_fingerprint": None}
    if body.stream:
        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            extra = {"usage": None} if body.include_usage else {}
            return {**common, **extra,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        return _stream(request, record, body, chunk)
    record = await _until_done(request, record)
    if (bad := _ended_badly(record)) is not None:
        raise bad
    return JSONResponse({**common, "usage": _usage(record), "choices": [
        {"index": 0, "text": "".join(record.output or []), "logprobs": None,
         "finish_reason": _finish_reason(record, body)}]})


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown(path: str, request: Request) -> Response:
    raise OpenAIError(404, f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
