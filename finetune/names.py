"""Names and references: the only strings from users that become paths, checked here at the boundary.

A model is ``owner/name``. A reference (ref) names one version of a model::

    owner/name            the latest version
    owner/name:latest     the same
    owner/name:3          version number 3
    owner/name:prod       an alias set with ``finetune versions alias``
    owner/name:1f3a9c0e   a prefix (at least 8 hex characters) of the version id

Up to 7 digits is a version number; 8 or more hex characters, digits only included, is an id prefix (about
one id in forty starts with 8 decimal digits, and its prefix must still name it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidNameError, InvalidRefError, UsageError

NAME_PATTERN = r"[a-z0-9_][a-z0-9._-]{0,63}"
ALIAS_PATTERN = r"[a-z][a-z0-9._-]{0,63}"
MIN_ID_PREFIX = 8
ID_LENGTH = 64  # hex characters of a sha256 version id
MAX_NUMBER_DIGITS = MIN_ID_PREFIX - 1  # longer digit strings are id prefixes (see the module docstring)
LATEST = "latest"
# A training's data.path naming a file uploaded to the service (``upload:FILE_ID``; see finetune.registry.files):
# never a path, so the config keeps it as it is and nothing shows where the server stores the bytes.
UPLOAD_SCHEME = "upload:"

_NAME_RE = re.compile(NAME_PATTERN)
_ALIAS_RE = re.compile(ALIAS_PATTERN)
_HEX_RE = re.compile(r"[0-9a-f]+")


def check_text(value: str, what: str) -> str:
    """Return ``value`` if it is Unicode text that can be stored and tokenized, else raise :class:`UsageError`.

    Python hands over command-line arguments and stdin that are not UTF-8 with the bad bytes smuggled in as lone
    surrogates (``caf\\udce9``); they only fail later, deep inside json or a tokenizer.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = value[err.start:err.end].encode("utf-8", "surrogateescape")
        raise UsageError(f"the {what} is not UTF-8 text (byte {bad.hex(' ')} at character {err.start + 1})",
                         "use a UTF-8 terminal or file (e.g. `export LANG=C.UTF-8`, or convert with iconv)") from None
    return value


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid owner or model name, else raise :class:`InvalidNameError`."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or ".." in value:
        raise InvalidNameError(
            f"invalid {what} {value!r}",
            f"use 1-64 characters matching {NAME_PATTERN} (lowercase letters, digits, '-', '_', '.'; "
            "not starting with '.' or '-'; no '..')",
        )
    return value


def check_alias(value: str) -> str:
    """Return ``value`` if it may be used as a version alias, else raise :class:`InvalidNameError`."""
    if value == LATEST:
        raise InvalidNameError("'latest' is reserved and cannot be set as an alias", "choose another alias name")
    if not isinstance(value, str) or not _ALIAS_RE.fullmatch(value) or ".." in value:
        raise InvalidNameError(
            f"invalid alias {value!r}", f"use 1-64 characters matching {ALIAS_PATTERN}, starting with a letter"
        )
    if len(value) >= MIN_ID_PREFIX and _HEX_RE.fullmatch(value):
        raise InvalidNameError(
            f"invalid alias {value!r}: it would read as a version id prefix", "add a non-hex character"
        )
    return value


def parse_model_name(value: str) -> tuple[str, str]:
    """Split ``owner/name`` into its two checked parts."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise InvalidNameError(
            f"invalid model name {value!r}",
            f"expected OWNER/NAME, each part matching {NAME_PATTERN}, for example alice/my-model",
        )
    owner, name = value.split("/")
    return check_name(owner, "owner"), check_name(name, "model name")


@dataclass(frozen=True)
class Ref:
    """A parsed version reference. ``kind`` is one of latest, number, alias, id_prefix."""

    owner: str
    name: str
    kind: str
    value: str | int | None = None

    @property
    def model(self) -> str:
        return f"{self.owner}/{self.name}"

    def __str__(self) -> str:
        return self.model if self.kind == "latest" and self.value is None else f"{self.model}:{self.value}"


def parse_ref(text: str) -> Ref:
    """Parse a version reference; see the module docstring for the accepted forms."""
    if not isinstance(text, str) or not text:
        raise InvalidRefError("empty version reference", "expected OWNER/NAME[:VERSION]")
    model, sep, selector = text.partition(":")
    try:
        owner, name = parse_model_name(model)
    except InvalidNameError as err:
        raise InvalidRefError(
            f"invalid reference {text!r}: {err.message}",
            "expected OWNER/NAME, OWNER/NAME:N, OWNER/NAME:latest, OWNER/NAME:ALIAS or OWNER/NAME:HEXPREFIX, "
            f"with OWNER and NAME matching {NAME_PATTERN}",
        ) from None
    if not sep:
        return Ref(owner, name, "latest")
    if selector == LATEST:
        return Ref(owner, name, "latest", LATEST)
    if selector.isdigit() and selector.isascii() and len(selector) <= MAX_NUMBER_DIGITS:
        number = int(selector)
        if number < 1:
            raise InvalidRefError(f"invalid reference {text!r}: version numbers start at 1")
        return Ref(owner, name, "number", number)
    if MIN_ID_PREFIX <= len(selector) <= ID_LENGTH and _HEX_RE.fullmatch(selector):
        return Ref(owner, name, "id_prefix", selector)
    if _ALIAS_RE.fullmatch(selector) and ".." not in selector:
        return Ref(owner, name, "alias", selector)
    raise InvalidRefError(
        f"invalid reference {text!r}: cannot read version selector {selector!r}",
        f"use a number, 'latest', an alias, or at least {MIN_ID_PREFIX} hex characters of the version id",
    )
