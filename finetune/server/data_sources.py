"""Where a training input's data comes from, as the server allows it: an uploaded file, or an allowed folder.

A remote user names data by the URL (or id) of a file they uploaded (``POST /v1/files``); the official client
does this itself when a file object is passed as an input. A path on the server's own disk is refused unless
the server was started with ``--allow-data-dir`` and the path lies inside one of those folders (after
resolving links), so that a token cannot read arbitrary files of the server. A hub dataset name
(``tatsu-lab/alpaca``) passes through for the data layer to load.

:func:`resolve_data_input` turns one value into what the engine reads; :func:`resolve_training_data` applies
it to ``data.path`` and ``data.eval`` of a training input, nested or dotted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import AccessDeniedError, DataError, NotFoundError, UsageError
from ..registry import Registry
from ..registry.accounts import Account
from ..registry.files import Files, is_file_id
from . import access
from .settings import ServerSettings

_FILE_URL = re.compile(r"/v1/files/([0-9a-f]{27})(?:/download)?/?")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DATA_KEYS = ("path", "eval")


def resolve_data_input(value: str, *, account: str | Account, registry: Registry, settings: ServerSettings) -> str:
    """The local path (or hub dataset name) that ``value`` stands for, if ``account`` may use it.

    ``value`` is a file URL (``{server}/v1/files/ID``, also ``.../download``), a file id, a path on the server
    (only inside ``settings.allowed_data_dirs``), or a hub dataset name. An unknown or foreign file is a 404;
    a server path outside the allow-list is a 403; an http URL of another resource is a 422.
    """
    text = value.strip()
    if text.startswith(("http://", "https://")):
        match = _FILE_URL.fullmatch(urlparse(text).path)
        if match is None:
            raise UsageError(f"cannot use {text!r} as data: the server reads uploaded files, not other URLs",
                             "upload it with POST /v1/files (replicate: client.files.create) and pass its URL")
        return _own_file(match.group(1), account, registry)
    if is_file_id(text):
        return _own_file(text, account, registry)
    path = Path(text).expanduser()
    if not path.is_absolute() and _HUB_ID.fullmatch(text) and path.suffix.lower() not in _DATA_SUFFIXES:
        return text  # a hub dataset name
    if not settings.allowed_data_dirs:
        raise AccessDeniedError(f"this server does not read data from its own disk ({text})",
                                "upload the file (POST /v1/files) and pass its URL, or start the server with "
                                "--allow-data-dir")
    if not path.is_absolute():
        raise UsageError(f"data path {text!r} must be absolute on the server",
                         "name a file inside: " + ", ".join(str(d) for d in settings.allowed_data_dirs))
    real = path.resolve()
    if not any(real.is_relative_to(Path(folder).resolve()) for folder in settings.allowed_data_dirs):
        raise AccessDeniedError(f"data path {text} is outside the folders this server allows",
                                "allowed: " + ", ".join(str(d) for d in settings.allowed_data_dirs))
    if not real.is_file():
        raise DataError(f"no data file at {text} on the server")
    return str(real)


def _own_file(file_id: str, account: str | Account, registry: Registry) -> str:
    try:
        stored = Files(registry).get(file_id)
    except NotFoundError:
        raise NotFoundError(f"file {file_id} not found", "upload it with POST /v1/files") from None
    access.check_owns(account, stored, "file", file_id, NotFoundError)
    return str(stored.path)


def resolve_training_data(training_input: dict[str, Any], *, account: str | Account, registry: Registry,
                          settings: ServerSettings) -> dict[str, Any]:
    """A copy of a training input whose ``data.path`` and file ``data.eval`` (nested under ``data`` or dotted,
    ``"data.path"``) are resolved by :func:`resolve_data_input`; an eval fraction is left as it is."""
    out = dict(training_input)

    def fix(value: Any) -> Any:
        if isinstance(value, str) and not _is_number(value):
            return resolve_data_input(value, account=account, registry=registry, settings=settings)
        return value

    if isinstance(out.get("data"), dict):
        out["data"] = {k: fix(v) if k in DATA_KEYS else v for k, v in out["data"].items()}
    for key in DATA_KEYS:
        if f"data.{key}" in out:
            out[f"data.{key}"] = fix(out[f"data.{key}"])
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
