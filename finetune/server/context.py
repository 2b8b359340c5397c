"""What a request handler needs from the app it runs in: the registry, the settings, the accounts.

``build_api`` stores them on ``app.state``; handlers take them as FastAPI dependencies
(``reg: RegistryDep``) so that no module keeps a global. The dependencies are ``async``: FastAPI runs a plain
function dependency in its thread pool, and a hop there and back for each one cost more than the whole read
they serve (see BENCHMARKS.md, "The HTTP API"). The hot read handlers (a model, its versions, one version,
the account) are ``async`` for the same reason: their work is a few ``stat`` calls and small file reads.
Handlers that do more (publish, upload, archive, list everything) stay plain functions in the pool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..registry import Registry
from ..registry.accounts import Accounts
from ..registry.index import VersionIndex
from .settings import ServerSettings
from .webhook_targets import WebhookPolicy
from .wire_cache import VersionJSON


async def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def get_settings(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


async def get_accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


def base_url(request: Request) -> str:
    """The server's URL as clients reach it, without a trailing slash: for links inside responses.

    ``--public-url`` when the operator set it; otherwise the address and port of the socket the request came in
    on (``http://127.0.0.1:8000``). Never the request's ``Host`` header: a client chooses that, and the official
    client follows ``next`` links with its token."""
    settings: ServerSettings = request.app.state.settings
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    server = request.scope.get("server")
    host, port = (server[0], server[1]) if server and server[0] else (settings.host, settings.port)
    host = f"[{host}]" if ":" in str(host) and not str(host).startswith("[") else host
    return f"http://{host}:{port}" if port else f"http://{host}"


def webhook_policy(request: Request) -> WebhookPolicy:
    """Where this server's webhooks may go (``--allow-webhook-host``), for the API's check of a webhook URL."""
    policy: WebhookPolicy = request.app.state.webhook_policy
    return policy


RegistryDep = Annotated[Registry, Depends(get_registry)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
AccountsDep = Annotated[Accounts, Depends(get_accounts)]


async def get_version_index(request: Request) -> VersionIndex:
    version_index: VersionIndex = request.app.state.version_index
    return version_index


VersionIndexDep = Annotated[VersionIndex, Depends(get_version_index)]


async def get_version_json(request: Request) -> VersionJSON:
    version_json: VersionJSON = request.app.state.version_json
    return version_json


VersionJSONDep = Annotated[VersionJSON, Depends(get_version_json)]
