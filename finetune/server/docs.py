"""The API's own reference, served only when the operator asks for it (``finetune serve --api-docs``).

``/v1/openapi.json`` is the schema FastAPI derives from the routes; ``/v1/docs`` is a plain HTML page built
here from that schema: every path with its methods and summaries. The page runs no script and loads nothing
from anywhere (FastAPI's own docs page pulls Swagger UI from a CDN, which would run third-party code on the
web app's origin), so it works offline. Without the flag both answer 404, as any unknown path does.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse

OPENAPI_PATH = "/v1/openapi.json"
DOCS_PATH = "/v1/docs"
_HEADERS = {"Content-Security-Policy": "default-src 'none'; base-uri 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def install(app: FastAPI) -> None:
    """Serve the schema and the page on ``app`` (call after every router is included)."""

    @app.get(OPENAPI_PATH, include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi(), headers={"Cache-Control": "no-store"})

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs_page() -> HTMLResponse:
        return HTMLResponse(render(app.openapi()), headers=_HEADERS)


def render(schema: dict[str, Any]) -> str:
    """The reference page of an OpenAPI schema: paths in order, each method with its summary and description."""
    esc = html.escape
    info = schema.get("info", {})
    rows = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            summary = op.get("summary") or ""
            description = op.get("description") or ""
            rows.append(f"<tr><td><code>{esc(method.upper())}</code></td><td><code>{esc(path)}</code></td>"
                        f"<td>{esc(summary)}<br><small>{esc(description)}</small></td></tr>")
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            "content='width=device-width,initial-scale=1'>"
            f"<title>{esc(str(info.get('title', 'API')))} API</title></head><body>"
            f"<h1>{esc(str(info.get('title', 'API')))} {esc(str(info.get('version', '')))}: HTTP API</h1>"
            f"<p>Requests send <code>Authorization: Bearer TOKEN</code>. The schema: "
            f"<a href='{OPENAPI_PATH}'>{OPENAPI_PATH}</a>.</p>"
            "<table><thead><tr><th>method</th><th>path</th><th>what it does</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></body></html>")
