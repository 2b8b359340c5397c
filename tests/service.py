"""A real HTTP server for tests: uvicorn on 127.0.0.1, a free port, over a temporary registry.

Use the ``live_server`` fixture (tests/conftest.py) in a test::

    def test_something(live_server):
        r = live_server.http("alice").get("/v1/models")          # httpx, alice's token, base URL set
        assert r.status_code == 200
        client = live_server.replicate("bob")                     # the official client, bob's token
        client.models.create("bob", "m", visibility="private", hardware="cpu")
        live_server.registry.list_models()                        # the registry behind it, for set-up and checks

Accounts ``alice`` and ``bob`` exist with one token each (``live_server.tokens[owner]``). For other settings
(a small page size, an upload limit, allowed data folders) or a restart over the same registry, use
:func:`running_server` directly::

    with running_server(registry, server_settings(page_size=2)) as server:
        ...

:func:`server_settings` are ``finetune serve``'s settings less the spare training worker (``train_prestart``):
most test servers train nothing, and a spare would import torch for each of them. Tests of the real workers
pass ``ServerSettings(...)`` (spare on, as served).

The server runs in a thread of the test process, so the app's services (``app.state.services``) start and
stop with it; leaving the ``with`` block stops it (a graceful uvicorn shutdown).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from finetune.app import create_app
from finetune.registry import Registry
from finetune.registry.accounts import Accounts
from finetune.server.settings import ServerSettings

ACCOUNTS = ("alice", "bob")
_START_TIMEOUT_S = 20.0
# Test servers speak plain HTTP on loopback, yet each httpx client (and transport) builds a TLS context, loading
# the CA bundle: ~0.03 s on a quiet machine, 0.1-0.15 s on a busy one, for each of the hundreds of clients the
# suite opens. One context, built once (as httpx builds its own), serves them all.
TLS = httpx.create_ssl_context()


@dataclass
class LiveServer:
    """A running server: its URL, registry, app, and a token per account."""

    url: str
    registry: Registry
    app: Any
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, owner: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[owner]}"}

    def http(self, owner: str | None = "alice", **kwargs: Any) -> httpx.Client:
        """An httpx client on the server's URL, with ``owner``'s token (``None``: no token)."""
        headers = {**(self.headers(owner) if owner else {}), **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 30.0),
                            verify=kwargs.pop("verify", TLS), **kwargs)

    def replicate(self, owner: str = "alice") -> Any:
        """The official ``replicate`` client, pointed at this server with ``owner``'s token."""
        import replicate

        return replicate.Client(api_token=self.tokens[owner], base_url=self.url,
                                transport=httpx.HTTPTransport(verify=TLS))


def server_settings(**fields: Any) -> ServerSettings:
    """Settings for a test server: the defaults, ``fields``, and no spare training worker unless asked."""
    return ServerSettings(**{"train_prestart": False, **fields})


class NoSlots:
    """A training executor with no slots: trainings are created and queued (their ``start`` webhook goes out),
    and none runs."""

    capacity = 0

    def start(self, training_id: str) -> None:
        raise AssertionError("no training may start here")

    def close(self) -> None:
        pass


def idle_training_queue(monkeypatch: Any) -> None:
    """Servers started after this (in ``monkeypatch``'s scope) queue trainings and never run one."""
    monkeypatch.setattr("finetune.server.training_service.LocalExecutor", lambda *args, **kwargs: NoSlots())


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; we keep the socket, so nobody takes it
    return sock


@contextmanager
def running_server(registry: Registry, settings: ServerSettings | None = None,
                   accounts: tuple[str, ...] = ACCOUNTS) -> Iterator[LiveServer]:
    """Run a server over ``registry`` until the block ends; tokens are created for ``accounts``."""
    import uvicorn

    sock = _free_socket()
    port = sock.getsockname()[1]
    settings = replace(settings or server_settings(), host="127.0.0.1", port=port)
    store = Accounts(registry)
    tokens = {owner: store.create_token(owner, label="tests") for owner in accounts}
    app = create_app(registry, settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", registry=registry, app=app, tokens=tokens)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
