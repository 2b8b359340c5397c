"""``GET /v1/account``, ``GET /v1/hardware``, ``GET /v1/webhooks/default/secret``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ..auth import AccountDep, current_account
from ..context import AccountsDep
from ..hardware import hardware_list
from ..objects import account_object

router = APIRouter(prefix="/v1", dependencies=[Depends(current_account)], tags=["account"])


@router.get("/account")
async def get_account(account: AccountDep) -> dict[str, Any]:
    """The account of the request's token."""
    return account_object(account)


@router.get("/hardware")
def list_hardware() -> list[dict[str, str]]:
    """``cpu`` and the GPUs of this machine, as ``[{sku, name}]``."""
    return hardware_list()


@router.get("/webhooks/default/secret")
def webhook_secret(account: AccountDep, accounts: AccountsDep) -> dict[str, str]:
    """The key that signs this account's webhooks (``webhook-signature``, HMAC-SHA256)."""
    return {"key": accounts.webhook_secret(account.username)}
