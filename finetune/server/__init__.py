"""The HTTP service: a Replicate-compatible API over the registry (``finetune serve``).

Import direction: ``server`` -> engine (training, queue, serving) -> ``registry`` -> foundation. Access rules
live in :mod:`.access` only; wire objects in :mod:`.objects`; errors become problem+json in :mod:`.problems`.
"""

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # FastAPI is imported on first use, not by `finetune.server.settings` (which every CLI call imports).
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
