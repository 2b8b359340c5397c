"""The web app's router, with every page registered: ``app.include_router(router)`` serves it at ``/``."""

from . import compare, live, manage, pages, playground, signin, train  # noqa: F401  (importing registers their routes)
from .core import router
from .signin import signin_link_path

__all__ = ["router", "signin_link_path"]
