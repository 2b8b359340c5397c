"""What a request handler needs from the app it runs in: the registry, the settings, the accounts.

``create_app`` stores them on ``app.state``; handlers take them as FastAPI dependencies
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
from .wire_cache import VersionJSON


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def get_accounts(request: Request) -> Accounts:
    return request.app.state.accounts


def base_url(request: Request) -> str:
    """The server's URL as clients reach it, without a trailing slash: for links inside responses."""
    public = request.app.state.settings.public_base_url
    return (public or str(request.base_url)).rstrip("/")


RegistryDep = Annotated[Registry, Depends(get_registry)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
AccountsDep = Annotated[Accounts, Depends(get_accounts)]


async def get_version_index(request: Request) -> VersionIndex:
    return request.app.state.version_index


VersionIndexDep = Annotated[VersionIndex, Depends(get_version_index)]


async def get_version_json(request: Request) -> VersionJSON:
    return request.app.state.version_json


VersionJSONDep = Annotated[VersionJSON, Depends(get_version_json)]
