"""Accounts of the HTTP service and their API tokens, stored in the registry.

An account is an owner name (the ``alice`` of ``alice/model``); it exists once a token has been created for it.
A token is shown once, when created; the registry keeps only its sha256, so a copy of the registry does not
leak working tokens. Layout (inside ``Registry.accounts_dir()``)::

    accounts/
      OWNER.json          username, created_at, webhook_secret (whsec_..., signs the account's webhooks)
      tokens/HASH.json    owner, id (the first 12 hex digits of HASH), label, created_at

Resolving a token is one file read named by its hash: no listing, no comparison loop. A revoked token's file
is removed, so it stops working at the next request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from .. import atomic
from ..errors import IntegrityError, NotFoundError, RegistryAccessError, UsageError
from ..names import check_text
from .manifest import utc_now
from .store import Registry

TOKEN_PREFIX = "ft_"
TOKEN_ID_LENGTH = 12
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Account:
    """A user of the service: the owner name its models live under."""

    username: str
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TokenInfo:
    """What the registry knows about a token (never the token itself)."""

    id: str
    owner: str
    label: str
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_hash(token: str) -> str:
    """The stored form of a token. Tokens are 256 random bits, so a plain sha256 is enough (no slow KDF)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Accounts:
    """Create accounts and tokens, list, revoke and resolve tokens, and hand out webhook secrets."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.layout = registry.layout
        self.root = self.layout.accounts

    # ---------------------------------------------------------------- paths
    def _account_path(self, owner: str) -> Path:
        return self.layout.account_file(owner)

    def _token_path(self, digest: str) -> Path:
        return self.layout.token_file(digest)

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.replace_file(path, atomic.pretty_json(data), self.layout.accounts_tmp)
        except OSError as err:
            raise RegistryAccessError(
                f"cannot write {path}: {err.strerror}", "check FINETUNE_HOME and permissions"
            ) from None
        # Secrets and token hashes: readable by the registry's owner only.
        os.chmod(path, 0o600)

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            return cast("dict[str, Any]", json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            raise IntegrityError(f"{path} is not valid JSON") from None
        except OSError as err:
            raise RegistryAccessError(
                f"cannot read {path}: {err.strerror}", "check FINETUNE_HOME and permissions"
            ) from None

    # ---------------------------------------------------------------- accounts
    def ensure_account(self, owner: str) -> Account:
        """The account ``owner``, created (with a fresh webhook secret) if it does not exist yet."""
        info = self._read(self._account_path(owner))
        if info is None:
            info = {"username": owner, "created_at": utc_now(), "webhook_secret": _new_webhook_secret()}
            self._write(self._account_path(owner), info)
        return Account(info["username"], info.get("created_at", ""))

    def get_account(self, owner: str) -> Account:
        """The account ``owner`` or :class:`NotFoundError`."""
        info = self._read(self._account_path(owner))
        if info is None:
            raise NotFoundError(f"no account {owner!r}", f"create one with `finetune tokens create {owner}`")
        return Account(info["username"], info.get("created_at", ""))

    def list_accounts(self) -> list[Account]:
        """Every account, sorted by name."""
        out = []
        for path in sorted(self.root.glob("*.json")):
            info = self._read(path)
            if info is not None:
                out.append(Account(info["username"], info.get("created_at", "")))
        return out

    def webhook_secret(self, owner: str) -> str:
        """The account's webhook signing secret (``whsec_`` + base64 key, as Replicate's clients expect)."""
        self.ensure_account(owner)
        info = self._read(self._account_path(owner)) or {}
        return cast(str, info["webhook_secret"])

    # ---------------------------------------------------------------- tokens
    def create_token(self, owner: str, label: str = "") -> str:
        """Create a token for ``owner`` (and the account if new); return the token. It is never shown again."""
        check_text(label, "label")  # before anything is written
        self.ensure_account(owner)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_hash(token)
        info = {"id": digest[:TOKEN_ID_LENGTH], "owner": owner, "label": label, "created_at": utc_now()}
        self._write(self._token_path(digest), info)
        return token

    def resolve(self, token: str) -> Account | None:
        """The account a token belongs to, or ``None`` for an unknown or revoked token."""
        if not token or len(token) > 512:
            return None
        info = self._read(self._token_path(token_hash(token)))
        if info is None:
            return None
        return Account(info["owner"])

    def list_tokens(self, owner: str | None = None) -> list[TokenInfo]:
        """Tokens (their ids and owners, never the tokens), oldest first; only ``owner``'s when given."""
        out = []
        for path in self.layout.tokens.glob("*.json"):
            info = self._read(path)
            if info is not None and (owner is None or info.get("owner") == owner):
                out.append(TokenInfo(info["id"], info["owner"], info.get("label", ""), info.get("created_at", "")))
        return sorted(out, key=lambda t: (t.created_at, t.id))

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke the token whose id (or a longer prefix of its hash) is ``token_id``; return what it was."""
        token_id = token_id.strip().lower()
        if len(token_id) < 8 or not set(token_id) <= _HEX:
            raise UsageError(f"invalid token id {token_id!r}", "use the ID column of `finetune tokens list`")
        matches = [p for p in self.layout.tokens.glob(f"{token_id}*.json")]
        if not matches:
            raise NotFoundError(f"no token with id {token_id}", "see `finetune tokens list`")
        if len(matches) > 1:
            raise UsageError(f"token id {token_id} is ambiguous", "give more hex digits")
        info = self._read(matches[0]) or {}
        matches[0].unlink()
        atomic.fsync_dir(matches[0].parent)
        return TokenInfo(info.get("id", token_id), info.get("owner", ""), info.get("label", ""),
                         info.get("created_at", ""))


def _new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
