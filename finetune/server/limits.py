"""The largest request body the server reads: uploads up to ``--max-upload-size`` (plus multipart framing).

A request that declares a larger ``Content-Length`` is answered 413 without handing it to the app; one that
does not declare it (chunked) is cut off with 413 as soon as it passes the limit, so a client cannot fill the
disk. Before answering, up to :data:`DRAIN_BYTES` more of the body are read and dropped: a server that closes a
connection with unread data in it makes the kernel reset the connection, and the client then sees a broken
connection instead of the 413. Past that, the connection is closed anyway.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import TooLargeError
from .problems import problem

FRAMING_BYTES = 1 << 20  # multipart boundaries, headers and the metadata field
DRAIN_BYTES = 64 << 20


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> TooLargeError:
        return TooLargeError(f"the request body is larger than the server's limit of {self.max_bytes} bytes",
                             "start the server with a larger --max-upload-size")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _drain(receive)
            response = problem(413, str(self._error()), headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive)
                    raise self._error()
            return message

        await self.app(scope, counting_receive, send)


async def _drain(receive: Receive) -> None:
    dropped = 0
    while dropped <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    headers: Any = scope.get("headers") or []
    for key, value in headers:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
