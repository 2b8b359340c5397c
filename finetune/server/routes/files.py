"""``/v1/files``: upload (multipart, as ``replicate.files.create`` sends it), list, get, download, delete.

A file is visible to its owner only; another account's file answers 404.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from ...errors import NotFoundError, TooLargeError, UsageError
from ...registry import Registry
from ...registry.files import Files, StoredFile
from .. import access
from ..auth import AccountDep, current_account
from ..context import RegistryDep, SettingsDep, base_url
from ..data_sources import check_unused
from ..objects import file_object
from ..pagination import page

router = APIRouter(prefix="/v1", dependencies=[Depends(current_account)], tags=["files"])
MAX_METADATA_CHARS = 16 << 10  # sent back with the file in every listing


def _own_file(files: Files, account: AccountDep, file_id: str) -> StoredFile:
    stored = files.get(file_id)
    access.check_owns(account, stored, "file", file_id, NotFoundError)
    return stored


@router.post("/files", status_code=201)
async def create_file(request: Request, account: AccountDep, reg: RegistryDep,
                      settings: SettingsDep) -> dict[str, Any]:
    """Store the multipart part ``content`` (with its filename and type); ``metadata`` is an optional JSON
    object. 413 past the server's ``--max-upload-size``."""
    async with request.form(max_files=1, max_fields=16) as form:
        upload = form.get("content")
        if not isinstance(upload, UploadFile):
            raise UsageError("the upload has no file part named 'content'",
                             "send multipart/form-data with the file as 'content' (as replicate.files.create does)")
        metadata = _metadata(form.get("metadata"))
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise TooLargeError(f"the upload is larger than the server's limit of {settings.max_upload_bytes} bytes",
                                "split the data, or start the server with a larger --max-upload-size")
        stored = await run_in_threadpool(
            Files(reg).create, account.username, upload.file, upload.filename or "file",
            upload.content_type or "application/octet-stream", metadata, settings.max_upload_bytes)
    return file_object(stored, base_url(request))


def _metadata(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str) and len(value) > MAX_METADATA_CHARS:
        raise UsageError(f"metadata is {len(value):,} characters of JSON; the most is {MAX_METADATA_CHARS:,}")
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except json.JSONDecodeError as err:
        raise UsageError(f"metadata is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(parsed, dict):
        raise UsageError("metadata must be a JSON object")
    return parsed


@router.get("/files")
def list_files(request: Request, account: AccountDep, reg: RegistryDep, settings: SettingsDep) -> dict[str, Any]:
    """The account's files, newest first, paginated."""
    files = {f.id: f for f in Files(reg).list(account.username)}
    base = base_url(request)
    return page(request, list(files), lambda file_id: file_object(files[file_id], base), descending=True,
                page_size=settings.page_size)


@router.get("/files/{file_id}")
def get_file(file_id: str, request: Request, account: AccountDep, reg: RegistryDep) -> dict[str, Any]:
    """One file's record."""
    return file_object(_own_file(Files(reg), account, file_id), base_url(request))


@router.get("/files/{file_id}/download")
def download_file(file_id: str, account: AccountDep, reg: RegistryDep) -> FileResponse:
    """The file's bytes, with its name and content type."""
    stored = _own_file(Files(reg), account, file_id)
    assert stored.path is not None  # Files.get sets it
    return FileResponse(stored.path, media_type=stored.content_type, filename=stored.name)


@router.delete("/files/{file_id}", status_code=204)
def delete_file(file_id: str, account: AccountDep, reg: RegistryDep) -> Response:
    """Delete a file of the account; 409 while a training that has not ended reads it."""
    remove_file(reg, account, file_id)
    return Response(status_code=204)


def remove_file(reg: Registry, account: Any, file_id: str) -> StoredFile:
    """Delete a file of ``account`` (404 for another's), refused while a training that has not ended reads it;
    the API and the web app both call this."""
    files = Files(reg)
    stored = _own_file(files, account, file_id)
    check_unused(reg, stored)
    files.delete(file_id)
    return stored
