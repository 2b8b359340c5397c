"""Files uploaded to the service: training data that remote users cannot name as a server path.

One folder per file inside ``Registry.files_dir()``::

    files/ID/
      file.json         id, owner, name, content_type, size, sha256, metadata, created_at
      content.EXT       the bytes; EXT is the uploaded name's suffix (.jsonl, .csv...), which data readers use

An upload is streamed into a staging folder (counting bytes against the limit and hashing as it goes), then
renamed into place whole, so a file is listed only once complete. Ids sort by upload time (hex milliseconds,
then random digits), so newest-first listing needs no reading of the records. Files belong to their owner.

A training names an upload as its data by reference, ``upload:ID`` (:func:`upload_ref`), never by the path of
its bytes: the record, the config in a version's manifest and its model card show that reference and the
file's own name and sha256, and errors in the file name it as uploaded (``bad.jsonl:2``).
:meth:`Files.data_file` turns a reference into the path to read when the training runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .. import atomic
from ..errors import IntegrityError, NotFoundError, TooLargeError
from ..names import UPLOAD_SCHEME, check_name
from .manifest import utc_now
from .store import Registry

RECORD = "file.json"
_CHUNK = 1 << 20
_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
_ID = re.compile(r"[0-9a-f]{27}")


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's record; ``path`` is where its bytes are."""

    id: str
    owner: str
    name: str
    content_type: str
    size: int
    sha256: str
    created_at: str
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("path")
        return out


def new_file_id() -> str:
    """27 hex digits: 11 of the upload time in milliseconds (sortable), 16 random."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(8)}"


def is_file_id(text: str) -> bool:
    return bool(_ID.fullmatch(text))


def upload_ref(file_id: str) -> str:
    """How a training's config names an uploaded file as data: ``upload:ID``."""
    return UPLOAD_SCHEME + file_id


def upload_id(value: object) -> str | None:
    """The file id of an ``upload:ID`` reference; None for anything else (a path, a hub name)."""
    if isinstance(value, str) and value.startswith(UPLOAD_SCHEME):
        return value[len(UPLOAD_SCHEME):]
    return None


class Files:
    """Store, read, list and delete uploaded files."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.root = registry.files_dir()

    def _dir(self, file_id: str) -> Path:
        if not is_file_id(file_id):
            raise NotFoundError(f"file {file_id} not found")
        return self.registry.layout.upload_dir(file_id)

    def create(self, owner: str, stream: BinaryIO, name: str, content_type: str = "application/octet-stream",
               metadata: dict[str, Any] | None = None, max_bytes: int | None = None) -> StoredFile:
        """Store the bytes of ``stream`` as a new file of ``owner``; :class:`TooLargeError` past ``max_bytes``."""
        check_name(owner, "owner")
        name = os.path.basename(name or "file")[:255] or "file"
        suffix = Path(name).suffix.lower()
        suffix = suffix if _SUFFIX.fullmatch(suffix) else ""
        stage = self.registry.staging_dir("upload")
        try:
            digest, size = hashlib.sha256(), 0
            content = stage / f"content{suffix}"
            with open(content, "xb") as out:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TooLargeError(f"the upload is larger than the server's limit of {max_bytes} bytes",
                                            "split the data, or start the server with a larger --max-upload-size")
                    digest.update(chunk)
                    out.write(chunk)
            atomic.fsync_file(content)
            file_id = new_file_id()
            record = StoredFile(id=file_id, owner=owner, name=name, content_type=content_type or
                                "application/octet-stream", size=size, sha256=digest.hexdigest(),
                                created_at=utc_now(), metadata=dict(metadata or {}))
            atomic.write_bytes_durable(stage / RECORD, atomic.pretty_json(record.to_dict()))
            atomic.fsync_dir(stage)
            self.root.mkdir(parents=True, exist_ok=True)
            atomic.rename_noreplace(stage, self.registry.layout.upload_dir(file_id))
            atomic.fsync_dir(self.root)
        except BaseException:
            atomic.remove_tree(stage)
            raise
        return self.get(file_id)

    def get(self, file_id: str) -> StoredFile:
        """The file ``file_id`` or :class:`NotFoundError` (the caller checks the owner)."""
        folder = self._dir(file_id)
        try:
            info = json.loads((folder / RECORD).read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"file {file_id} not found") from None
        except json.JSONDecodeError:
            raise IntegrityError(f"{folder / RECORD} is not valid JSON") from None
        content = next(folder.glob("content*"), None)
        if content is None:
            raise IntegrityError(f"file {file_id} has no content", "delete it and upload it again")
        return StoredFile(**{k: info[k] for k in StoredFile.__dataclass_fields__ if k in info}, path=content)

    def data_file(self, value: str) -> tuple[str, str | None]:
        """``(what to read, how to name it)`` for a training's ``data.path``/``data.eval``: for ``upload:ID``
        the stored bytes and the name it was uploaded with; anything else as it is, with no name."""
        file_id = upload_id(value)
        if file_id is None:
            return value, None
        try:
            stored = self.get(file_id)
        except NotFoundError:
            raise NotFoundError(f"the uploaded data file {file_id} is gone (deleted since the training was "
                                "created)", "upload it again and start a new training") from None
        return str(stored.path), stored.name

    def ids(self) -> list[str]:
        """Every file id, newest first (ids sort by upload time)."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted((n for n in names if is_file_id(n)), reverse=True)

    def list(self, owner: str) -> list[StoredFile]:
        """``owner``'s files, newest first."""
        out = []
        for file_id in self.ids():
            try:
                f = self.get(file_id)
            except (NotFoundError, IntegrityError):
                continue  # deleted meanwhile, or damaged: not listed
            if f.owner == owner:
                out.append(f)
        return out

    def delete(self, file_id: str) -> None:
        """Remove a file (the caller checks the owner)."""
        folder = self._dir(file_id)
        if not (folder / RECORD).exists():
            raise NotFoundError(f"file {file_id} not found")
        target = self.registry.staging_dir("delete-file")
        os.rename(folder, target / file_id)
        atomic.fsync_dir(self.root)
        atomic.remove_tree(target)

