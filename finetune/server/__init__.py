"""The HTTP service: a Replicate-compatible API over the registry (``finetune serve``).

Import direction: ``server`` -> engine (training, queue, serving) -> ``registry`` -> foundation. Access rules
live in :mod:`.access` only; wire objects in :mod:`.objects`; errors become problem+json in :mod:`.problems`.
The web app is an adapter beside this one: :func:`finetune.app.create_app` assembles the two.
"""

from typing import Any

__all__ = ["ServerSettings", "build_api"]


def __getattr__(name: str) -> Any:
    # FastAPI is imported on first use, not by `finetune.server.settings` (which every CLI call imports).
    if name == "build_api":
        from .app import build_api

        return build_api
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
