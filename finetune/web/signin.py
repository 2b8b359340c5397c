"""Signing in and out: the API-token form, and the one-time link ``finetune serve --open-browser`` prints."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from .core import (
    CsrfRefused,
    check_csrf,
    current_session,
    render,
    router,
    sessions,
    sessions_of,
    set_session_cookie,
)
from .session import CSRF_FIELD, SIGNIN_COOKIE, SIGNIN_TOKEN_TTL_S

LINK_PATH = "/signin/link/"
MAX_TOKEN_CHARS = 200  # tokens are ~50 characters; nothing longer is hashed


def _safe_next(target: Any) -> str:
    """Only a path on this site (never ``//evil.example`` or ``https://...``): no open redirect."""
    target = target if isinstance(target, str) else ""
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/"


def _signin_page(request: Request, next_path: str, error: str | None = None, status_code: int = 200) -> Response:
    """The sign-in form with a fresh CSRF value, repeated in a cookie; the server keeps nothing."""
    csrf = sessions(request).signin_token()
    response = render(request, "signin.html", {"title": "Sign in", "next": next_path, "csrf": csrf,
                                               **({"error": error} if error else {})}, status_code=status_code)
    response.set_cookie(SIGNIN_COOKIE, csrf, max_age=SIGNIN_TOKEN_TTL_S, httponly=True, samesite="strict",
                        path="/signin", secure=request.url.scheme == "https")
    return response


@router.get("/signin")
def signin_form(request: Request, next: str = "/") -> Response:
    session = current_session(request)
    if session is not None and session.account:
        return RedirectResponse(_safe_next(next), status_code=303)
    return _signin_page(request, _safe_next(next))


async def _signin_form(request: Request) -> dict[str, Any]:
    """The sign-in POST's form, if its CSRF value matches its cookie's and is this server's; else 403."""
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    if not sessions(request).signin_token_ok(request.cookies.get(SIGNIN_COOKIE), sent if isinstance(sent, str)
                                             else None):
        raise CsrfRefused
    return form


@router.post("/signin")
def signin(request: Request, form: Annotated[dict, Depends(_signin_form)]) -> Response:
    token = str(form.get("token") or "").strip()[:MAX_TOKEN_CHARS]
    target = _safe_next(form.get("next"))
    account = request.app.state.accounts.resolve(token) if token else None
    if account is None:
        error = "enter your API token" if not token else "this token is not valid (unknown or revoked)"
        return _signin_page(request, target, error, status_code=401)
    session = sessions(request).sign_in(current_session(request), account.username, token)
    response = RedirectResponse(target, status_code=303)
    set_session_cookie(request, response, session)
    response.delete_cookie(SIGNIN_COOKIE, path="/signin")
    return response


@router.post("/signout")
def signout(request: Request, form: Annotated[dict, Depends(check_csrf)]) -> Response:
    session = current_session(request)
    if session is not None:
        sessions(request).drop(session.id)
    response = RedirectResponse("/signin", status_code=303)
    response.delete_cookie("finetune_session", path="/")
    return response


@router.get(LINK_PATH + "{nonce}")
def signin_link(request: Request, nonce: str) -> Response:
    """Redeem a one-time link: the browser that opens it first is signed in; the link then stops working."""
    redeemed = sessions(request).redeem_link(nonce)
    if redeemed is None:
        return render(request, "error.html", {"title": "Link used", "heading": "This sign-in link has expired",
                                              "message": "A sign-in link works once and for 15 minutes.",
                                              "hint": "Sign in with an API token instead."}, status_code=410)
    account, token = redeemed
    session = sessions(request).sign_in(current_session(request), account, token)
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(request, response, session)
    return response


def signin_link_path(app: FastAPI, account: str) -> str:
    """A one-time sign-in path (``/signin/link/...``) for ``account``, for ``finetune serve --open-browser``.

    The link's session is backed by a token created for it (label ``web sign-in link``), so it follows the same
    rules as a token sign-in: revoking the token ends the session.
    """
    token = app.state.accounts.create_token(account, label="web sign-in link")
    return LINK_PATH + sessions_of(app).issue_link(account, token)
