"""Errors as ``application/problem+json`` (RFC 7807): ``{title, detail, status}``, never a stack trace.

One handler per kind of failure: our own :class:`~finetune.errors.FinetuneError` (its status from the class),
HTTP errors raised by routing (unknown path 404, wrong method 405), request validation (malformed JSON is a
400 naming line and column; a well-formed body with wrong fields is a 422 naming them), and anything else
(500, logged on the server with its traceback, the client sees only the exception's type). Input problems
(a config's, a prediction input's) also come as ``errors``: a list of ``{field, message}``.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors

log = logging.getLogger("finetune.server")

PROBLEM_JSON = "application/problem+json"

def status_for(err: errors.FinetuneError) -> int:
    """The HTTP status of one of our errors: its class's ``http_status`` (500 when it has none)."""
    status = getattr(err, "http_status", 500)
    return status if isinstance(status, int) and 400 <= status < 600 else 500


def problem(status: int, detail: str, title: str | None = None, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    """A problem+json response; ``title`` defaults to the status's reason phrase."""
    body = {"title": title or _reason(status), "detail": detail, "status": status, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def json_error_detail(doc: str | bytes, pos: int, msg: str) -> str:
    """'Expecting ',' delimiter at line 4, column 3' for a JSON document that failed to parse at ``pos``."""
    text = doc.decode("utf-8", "replace") if isinstance(doc, (bytes, bytearray)) else str(doc)
    err = json.JSONDecodeError(msg, text, min(max(pos, 0), len(text)))
    return f"the request body is not valid JSON: {msg} at line {err.lineno}, column {err.colno}"


def _validation_detail(exc: RequestValidationError) -> tuple[int, str, list[dict[str, str]]]:
    """(status, detail, problems by field) for a request the body models refuse."""
    problems = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            pos = e["loc"][1] if len(e.get("loc", ())) > 1 and isinstance(e["loc"][1], int) else 0
            return 400, json_error_detail(exc.body or "", pos, e.get("ctx", {}).get("error", "malformed JSON")), []
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        if loc == "body" and e.get("type") in ("model_attributes_type", "dict_type"):
            return 422, "the request body must be a JSON object (send it with Content-Type: application/json)", []
        message = e.get("msg", "invalid")
        value = e.get("input")
        if e.get("type") != "missing" and (value is None or isinstance(value, (str, int, float, bool))):
            shown = repr(value)
            message += f", got {shown if len(shown) <= 40 else shown[:37] + '...'}"
        problems.append({"field": loc, "message": message})
    detail = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return 422, detail or "invalid request", problems


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(errors.FinetuneError)
    async def _ours(request: Request, exc: errors.FinetuneError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        fields = getattr(exc, "fields", None)  # input problems by field: also as a list a client can place
        return problem(status, str(exc), headers=headers, **({"errors": fields} if fields else {}))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem(exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, detail, problems = _validation_detail(exc)
        extra: dict[str, Any] = {"errors": problems} if problems else {}
        return problem(status, detail, **extra)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return problem(500, f"internal error ({type(exc).__name__}); the server log has the details")
