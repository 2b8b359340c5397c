"""The web app's plumbing: the router, HTML rendering, the signed-in user, CSRF checks and error pages.

Pages are served by the same FastAPI app as the API (``create_app`` includes :data:`router`). Errors raised by
the engine or by the access rules (:mod:`finetune.server.access`) become an HTML page with the error's own HTTP
status and message, or a problem+json body for the page's scripts (``Accept: application/json``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from ..errors import FinetuneError
from .session import COOKIE, CSRF_FIELD, CSRF_HEADER, Session, Sessions

_PACKAGE = resources.files("finetune.web")
templates = Jinja2Templates(directory=str(_PACKAGE / "templates"))
STATIC = {"style.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}
# Pages load nothing from elsewhere and run no inline script; nobody may frame them.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
_static_cache: dict[str, tuple[bytes, str]] = {}
_lock = threading.Lock()


def static_file(name: str) -> tuple[bytes, str]:
    """A shipped static file's bytes and a short hash of them (for cache-busting URLs)."""
    if name not in _static_cache:
        body = (_PACKAGE / "static" / name).read_bytes()
        _static_cache[name] = (body, hashlib.sha256(body).hexdigest()[:10])
    return _static_cache[name]


def _static_url(name: str) -> str:
    return f"/static/{name}?v={static_file(name)[1]}"


templates.env.globals["static"] = _static_url


class SignInRequired(Exception):
    """The page needs a signed-in user; the browser is sent to the sign-in form."""


class CsrfRefused(Exception):
    """A state-changing request without the session's CSRF token."""


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


def status_of(err: FinetuneError) -> int:
    return int(err.http_status)


class WebRoute(APIRoute):
    """A page route: engine errors become an HTML error page (or JSON for scripts), not problem+json."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                if wants_json(request):
                    return JSONResponse({"title": "sign-in required", "detail": "sign in again", "status": 401},
                                        status_code=401, media_type="application/problem+json")
                return RedirectResponse(f"/signin?next={quote(target, safe='')}", status_code=303)
            except CsrfRefused:
                return error_page(request, 403, "Refused",
                                  "This form did not carry this session's security token, so nothing was changed.",
                                  "Reload the page and submit the form again.")
            except FinetuneError as err:
                return error_page(request, status_of(err), _heading(status_of(err)), err.message, err.hint)

        return route


def _heading(status: int) -> str:
    return {401: "Sign-in required", 403: "Not allowed", 404: "Not found", 409: "Conflict"}.get(status, "Error")


router = APIRouter(route_class=WebRoute, include_in_schema=False)


def sessions_of(app: Any) -> Sessions:
    """The app's session store, created on first use (one per app)."""
    with _lock:
        if getattr(app.state, "web_sessions", None) is None:
            app.state.web_sessions = Sessions()
    return app.state.web_sessions


def sessions(request: Request) -> Sessions:
    return sessions_of(request.app)


def current_session(request: Request) -> Session | None:
    return sessions(request).get(request.cookies.get(COOKIE))


@dataclass
class WebUser:
    """The signed-in account of a page request and its session."""

    account: str
    session: Session


def signed_in(request: Request) -> WebUser:
    """The signed-in user (a FastAPI dependency); the session's token is checked again on every request."""
    session = current_session(request)
    if session is None or session.account is None:
        raise SignInRequired
    accounts = request.app.state.accounts
    if session.token is not None:
        account = accounts.resolve(session.token)
        if account is None or account.username != session.account:
            sessions(request).drop_token(session.token)
            raise SignInRequired
    return WebUser(session.account, session)


async def check_csrf(request: Request) -> dict[str, Any]:
    """The submitted form, if it carries the session's CSRF token (field or header); else :class:`CsrfRefused`.

    Use as a dependency of every state-changing route (after :func:`signed_in` where one is needed)."""
    session = current_session(request)
    form = await request.form()
    sent = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
    if session is None or not session.csrf_ok(sent if isinstance(sent, str) else None):
        raise CsrfRefused
    return form


def set_session_cookie(request: Request, response: Response, session: Session) -> None:
    response.set_cookie(COOKIE, session.id, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200,
           user: WebUser | None = None) -> HTMLResponse:
    session = user.session if user else current_session(request)
    ctx = {"user": user.account if user else None, "csrf": session.csrf if session else "", **context}
    if session is not None and session.flash and "flash" not in ctx:
        ctx["flash"], session.flash = session.flash, None
    response = templates.TemplateResponse(request, name, ctx, status_code=status_code)
    response.headers.update(PAGE_HEADERS)
    return response


def error_page(request: Request, status: int, heading: str, message: str, hint: str | None = None) -> Response:
    if wants_json(request):
        return JSONResponse({"title": heading, "detail": message + (f" — {hint}" if hint else ""), "status": status},
                            status_code=status, media_type="application/problem+json")
    session = current_session(request)
    user = WebUser(session.account, session) if session is not None and session.account else None
    return render(request, "error.html", {"heading": heading, "message": message, "hint": hint, "title": heading},
                  status_code=status, user=user)


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        return Response(status_code=404)
    body, _ = static_file(name)
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "public, max-age=31536000, immutable"})
