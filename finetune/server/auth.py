"""Who is calling: ``Authorization: Bearer TOKEN`` (or the older ``Token TOKEN``) resolved to an account.

Every ``/v1`` router depends on :func:`current_account`; a handler that needs the account takes
``account: AccountDep``. FastAPI runs the dependency once per request however many times it is named.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..errors import AuthenticationError
from ..registry.accounts import Account

_SCHEMES = ("bearer", "token")
_HOW = "send `Authorization: Bearer TOKEN`; create a token with `finetune tokens create OWNER`"


def token_from_header(value: str | None) -> str:
    """The token of an Authorization header value, or :class:`AuthenticationError` saying what is wrong."""
    if not value:
        raise AuthenticationError("missing Authorization header", _HOW)
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() not in _SCHEMES or not token.strip():
        raise AuthenticationError("unsupported Authorization header (expected Bearer TOKEN or Token TOKEN)", _HOW)
    return token.strip()


async def current_account(request: Request) -> Account:
    """The account of the request's token; 401 when the token is missing, unknown or revoked.

    Run on the event loop (one small file read) rather than in the thread pool: see :mod:`.context`."""
    token = token_from_header(request.headers.get("authorization"))
    account: Account | None = request.app.state.accounts.resolve(token)
    if account is None:
        raise AuthenticationError("invalid or revoked token", _HOW)
    return account


AccountDep = Annotated[Account, Depends(current_account)]
