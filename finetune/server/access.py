"""Who may see and do what: THE one place for access rules (the API and the web app both call these).

- An account creates models only under its own owner name (403 otherwise).
- Another owner's private model, and its versions, trainings and predictions, answer 404, exactly as a model
  that does not exist: the response never tells whether a private name is taken.
- Public models and their versions are readable by every account.
- Only the owner trains into, edits or deletes a model or its versions (403 on a public model of another
  owner; 404 on a private one, by the rule above).
- Trainings, predictions and files are visible to the account that owns them only.

``account`` is the caller's username (an :class:`~finetune.registry.accounts.Account` is accepted too).
"""

from __future__ import annotations

from typing import Any

from ..errors import (
    AccessDeniedError,
    FinetuneError,
    InvalidNameError,
    ModelNotFoundError,
    TrainingNotFoundError,
    UsageError,
    VersionNotFoundError,
)
from ..names import ID_LENGTH, parse_model_name
from ..registry import Model, Registry, Version
from ..registry.accounts import Account
from ..registry.index import VersionIndex

_HEX = frozenset("0123456789abcdef")


def username(account: str | Account) -> str:
    return account.username if isinstance(account, Account) else account


def can_read(account: str | Account, model: Model) -> bool:
    """Whether ``account`` may see ``model`` (its own, or public)."""
    return model.visibility == "public" or model.owner == username(account)


def check_create(account: str | Account, owner: str) -> None:
    """An account creates models under its own name only."""
    if owner != username(account):
        raise AccessDeniedError(
            f"{username(account)} cannot create models under {owner!r}",
            f"create it as {username(account)}/NAME, or use a token of {owner}",
        )


def visible_model(reg: Registry, account: str | Account, name: str) -> Model:
    """The model ``owner/name`` if ``account`` may see it; otherwise 404, the same as a missing model."""
    try:
        parse_model_name(name)
        model = reg.get_model(name)
    except (ModelNotFoundError, InvalidNameError):
        model = None
    if model is None or not can_read(account, model):
        raise ModelNotFoundError(f"model {name} not found")
    return model


def owned_model(reg: Registry, account: str | Account, name: str, action: str = "change") -> Model:
    """The model if ``account`` owns it; 404 if it may not even see it, 403 if it may only read it."""
    model = visible_model(reg, account, name)
    if model.owner != username(account):
        raise AccessDeniedError(f"only {model.owner} may {action} {name}")
    return model


def visible_models(reg: Registry, account: str | Account) -> list[Model]:
    """Every model ``account`` may see, sorted by ``owner/name``."""
    return [m for m in reg.list_models() if can_read(account, m)]


def visible_version(reg: Registry, account: str | Account, name: str, selector: str,
                    index: VersionIndex | None = None) -> Version:
    """A version of a model ``account`` may see. ``selector`` is the 64-hex id (as in Replicate's API), or
    any selector of a ref (number, alias, id prefix); a missing version is 404 like a hidden one."""
    model = visible_model(reg, account, name)
    selector = selector.lower() if len(selector) == ID_LENGTH else selector
    version = None
    try:
        if len(selector) == ID_LENGTH and set(selector) <= _HEX:
            version = (index or VersionIndex(reg)).find(selector, model.full_name)
        else:
            version = reg.resolve(f"{model.full_name}:{selector}")
    except (VersionNotFoundError, UsageError):
        version = None
    if version is None:
        raise VersionNotFoundError(f"version {selector} of {name} not found")
    return version


def visible_version_by_id(reg: Registry, account: str | Account, version_id: str,
                          index: VersionIndex | None = None) -> Version:
    """A version named by its bare 64-hex id (as ``POST /v1/predictions`` takes it), in any model ``account``
    may see. An unknown id and a version of another account's private model answer the same 404, which names
    only the id: the answer never tells that the id exists, nor which model holds it."""
    lowered = version_id.lower() if isinstance(version_id, str) else ""
    version = None
    if len(lowered) == ID_LENGTH and set(lowered) <= _HEX:
        version = (index or VersionIndex(reg)).find(lowered)
    if version is not None:
        try:
            readable = can_read(account, reg.get_model(version.model))
        except (ModelNotFoundError, InvalidNameError):
            readable = False
        version = version if readable else None
    if version is None:
        raise VersionNotFoundError(f"version {version_id} not found",
                                   "give its 64-hex id or owner/name:ID (GET /v1/models/{owner}/{name}/versions)")
    return version


def owned_version(reg: Registry, account: str | Account, name: str, selector: str,
                  index: VersionIndex | None = None, action: str = "change") -> Version:
    """A version of a model ``account`` owns (404 / 403 as :func:`owned_model`)."""
    owned_model(reg, account, name, action)
    return visible_version(reg, account, name, selector, index)


def owner_of(obj: Any) -> str:
    """The account a training, prediction or file belongs to: its ``account`` field, else (trainings started
    from the CLI) the owner of its destination model."""
    get = obj.get if isinstance(obj, dict) else lambda key, default=None: getattr(obj, key, default)
    owner = get("account", None) or get("owner", None)
    if owner:
        return str(owner)
    destination = get("destination", None) or ""
    return destination.split("/", 1)[0] if "/" in destination else ""


def check_owns(account: str | Account, obj: Any, what: str, ident: str,
               error: type[FinetuneError] = TrainingNotFoundError) -> None:
    """404 (``error``) unless ``account`` owns ``obj`` (a training, prediction or file record)."""
    if owner_of(obj) != username(account):
        raise error(f"{what} {ident} not found")
