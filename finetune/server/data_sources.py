"""Where a training input's data comes from, as the server allows it: an uploaded file, or an allowed folder.

A remote user names data by the URL (or id) of a file they uploaded (``POST /v1/files``); the official client
does this itself when a file object is passed as an input. It becomes ``upload:ID`` in the training's config
(:func:`finetune.registry.files.upload_ref`), never the path where the server keeps the bytes. An absolute path
on the server's own disk is accepted only when the server was started with ``--allow-data-dir`` and the path
lies inside one of those folders (after resolving links), so that a token cannot read arbitrary files of the
server. Nothing else is: not a relative path nor an ``owner/name`` hub dataset name, which the data layer
would look up in the server's working directory first, and whose answer would tell whether such a path
exists there. Every check runs before the training is created (before the 201).

:func:`resolve_data_input` turns one value into what the engine reads; :func:`resolve_training_data` applies
it to ``data.path`` and ``data.eval`` of a training input, nested or dotted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import AccessDeniedError, ConflictError, DataError, NotFoundError, UsageError
from ..registry import Registry
from ..registry.accounts import Account
from ..registry.files import Files, is_file_id, upload_id, upload_ref
from . import access
from .settings import ServerSettings

_FILE_URL = re.compile(r"/v1/files/([0-9a-f]{27})(?:/download)?/?")
DATA_KEYS = ("path", "eval")


def resolve_data_input(value: str, *, account: str | Account, registry: Registry, settings: ServerSettings) -> str:
    """What the trainer reads for ``value`` (``upload:ID``, or an allowed server path), if ``account`` may use it.

    ``value`` is a file URL (``{server}/v1/files/ID``, also ``.../download``), a file id (both become
    ``upload:ID``), or an absolute path on the server (only inside ``settings.allowed_data_dirs``). An unknown
    or foreign file is a 404; a server path outside the allow-list is a 403; anything else is a 422.
    """
    text = value.strip()
    if text.startswith(("http://", "https://")):
        match = _FILE_URL.fullmatch(urlparse(text).path)
        if match is None:
            raise UsageError(f"cannot use {text!r} as data: the server reads uploaded files, not other URLs",
                             "upload it with POST /v1/files (replicate: client.files.create) and pass its URL")
        return _own_file(match.group(1), account, registry)
    if is_file_id(text) or upload_id(text) is not None:
        return _own_file(upload_id(text) or text, account, registry)
    path = Path(text)
    if not settings.allowed_data_dirs or not path.is_absolute():
        # Never looked up on the disk (nor as a hub dataset): the answer is the same whether it exists or not
        raise UsageError(f"cannot use {text[:200]!r} as data: this server trains on uploaded files"
                         + (" and on absolute paths inside the folders it allows" if settings.allowed_data_dirs
                            else ""),
                         "upload the file (POST /v1/files; replicate: client.files.create) and pass its URL")
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
    return upload_ref(stored.id)


def check_unused(registry: Registry, stored: Any) -> None:
    """Refuse (409) to delete an uploaded file while a training that has not ended reads it: it would fail when it
    starts or resumes. Ended trainings keep only its name and sha256, so the file may go."""
    from ..registry.jobs import Trainings

    ref = upload_ref(stored.id)
    for record in Trainings(registry).unfinished():  # through the index: ended records are not read
        data = (record.input or {}).get("data") or {}
        if ref in (data.get("path"), data.get("eval")):
            raise ConflictError(f"{stored.name} is the data of training {record.id} ({record.status})",
                                "cancel that training, or wait until it ends, then delete the file")


def resolve_training_data(training_input: dict[str, Any], *, account: str | Account, registry: Registry,
                          settings: ServerSettings) -> dict[str, Any]:
    """A copy of a training input whose ``data.path`` and file ``data.eval`` (nested under ``data`` or dotted,
    ``"data.path"``) are resolved by :func:`resolve_data_input`; an eval fraction is left as it is."""
    out = dict(training_input)

    def fix(value: Any) -> Any:
        if isinstance(value, str) and not is_number(value):
            return resolve_data_input(value, account=account, registry=registry, settings=settings)
        return value

    if isinstance(out.get("data"), dict):
        out["data"] = {k: fix(v) if k in DATA_KEYS else v for k, v in out["data"].items()}
    for key in DATA_KEYS:
        if f"data.{key}" in out:
            out[f"data.{key}"] = fix(out[f"data.{key}"])
    return out


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
