"""The application ``finetune serve`` runs: the HTTP API (:mod:`finetune.server`) and the web app
(:mod:`finetune.web`) in one ASGI app.

The two are adapters side by side over the same services; this module, above both, puts them together, so that
neither imports the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import Registry
from .server.app import build_api
from .server.settings import ServerSettings
from .web.app import router as web_router

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServerSettings", "create_app"]


def create_app(registry: Registry | None = None, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving ``registry`` (default: ``$FINETUNE_HOME``) with ``settings`` (default: localhost): the API
    at ``/v1`` and the web app's pages at ``/``."""
    app = build_api(registry, settings)
    app.include_router(web_router)  # last, so that /v1 wins
    return app
