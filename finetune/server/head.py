"""``HEAD`` on every ``GET`` resource: answered as the ``GET`` would be, headers only (RFC 9110 section 9.3.2).

FastAPI routes a ``GET`` handler for ``GET`` alone, so a ``HEAD`` was a 405. This middleware hands a ``HEAD``
request to the app as a ``GET`` and uvicorn, which still sees the ``HEAD``, sends the headers (with the
``Content-Length`` the body would have) and drops the body. Excepted are the routes in :data:`NO_HEAD`, where
running the ``GET`` would do something: event streams (a client that hangs up cancels a prediction) and the
one-time sign-in link (it would be spent). Those answer 405 with ``Allow: GET``.
"""

from __future__ import annotations

import re

from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from .problems import problem

NO_HEAD = (
    "/v1/predictions/{prediction_id}/stream",  # the API's server-sent events
    "/predictions/{prediction_id}/stream",  # the web playground's
    "/signin/link/{nonce}",
)
_NO_HEAD = re.compile("|".join(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(p)) for p in NO_HEAD))


class HeadAsGet:
    """ASGI middleware: ``HEAD`` requests run the ``GET`` route of their path (see the module docstring)."""

    def __init__(self, app: ASGIApp, router: object):
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        if _NO_HEAD.fullmatch(scope["path"]):
            response = problem(405, f"HEAD is not allowed on {scope['path']}", headers={"Allow": "GET"})
            await response(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}  # uvicorn keeps its own scope (HEAD) and sends no body
        if any(route.matches(as_get)[0] == Match.FULL for route in getattr(self.router, "routes", ())):
            await self.app(as_get, receive, send)
            return
        await self.app(scope, receive, send)  # no GET here: the app answers 404 or 405 for the HEAD itself
