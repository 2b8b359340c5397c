"""Managing what you own: a model's settings (description, README, visibility, deletion) and your uploads.

Each action calls what the API's routes call for it (:mod:`.services`), so the same guards apply: only the
owner edits or deletes, a model with versions is not deleted, an upload a waiting or running training reads is
not deleted, and the registry's text limits hold.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from ..errors import FinetuneError
from ..registry import VISIBILITIES
from ..registry.files import upload_ref
from ..registry.jobs import FINAL
from ..registry.models import TEXT_LIMITS
from ..server import access
from . import services
from .core import render, router
from .pages import Form, User, model_context, registry
from .start_points import user_records
from .views import size, when_short

EDITED = ("description", "readme", "visibility")


def _settings_page(request: Request, user: Any, owner: str, name: str, form: dict[str, str] | None = None,
                   errors: dict[str, list[str]] | None = None, status_code: int = 200) -> Response:
    ctx = model_context(request, user, f"{owner}/{name}", "settings")
    model = access.owned_model(registry(request), user.account, f"{owner}/{name}", "change the settings of")
    form = form or {"description": model.description, "readme": model.readme or "", "visibility": model.visibility}
    ctx.update(form=form, errors=errors or {}, visibilities=VISIBILITIES, limits=TEXT_LIMITS)
    return render(request, "tab_settings.html", ctx, status_code=status_code, user=user)


@router.get("/models/{owner}/{name}/settings")
def settings_tab(request: Request, user: User, owner: str, name: str) -> Response:
    return _settings_page(request, user, owner, name)


def _field_of(err: FinetuneError) -> str:
    """The field a registry refusal is about (its message names it), else the whole form."""
    return next((key for key in EDITED if key in err.message), "_form")


@router.post("/models/{owner}/{name}/settings")
def save_settings(request: Request, user: User, form: Form, owner: str, name: str) -> Response:
    """Save description, README and visibility as ``PATCH /v1/models/{owner}/{name}`` does."""
    values = {key: str(form.get(key) or "") for key in EDITED}
    values["description"] = values["description"].strip()
    errors: dict[str, list[str]] = {}
    if values["visibility"] not in VISIBILITIES:
        errors["visibility"] = [f"invalid visibility {values['visibility']!r} — use one of: {', '.join(VISIBILITIES)}"]
    if not errors:  # the text fields carry the registry's limits as maxlength; its own check has the last word
        try:
            services.edit_model(request, user.account, f"{owner}/{name}", values)
        except FinetuneError as err:
            errors[_field_of(err)] = [str(err)]
    if errors:
        return _settings_page(request, user, owner, name, values, errors, status_code=422)
    user.session.flash = {"kind": "ok", "text": f"Saved the settings of {owner}/{name}."}
    return RedirectResponse(f"/models/{owner}/{name}/settings", status_code=303)


@router.post("/models/{owner}/{name}/delete")
def delete_model(request: Request, user: User, form: Form, owner: str, name: str) -> Response:
    """Delete the model as ``DELETE /v1/models/{owner}/{name}`` does (refused while it has versions)."""
    try:
        services.delete_model(request, user.account, f"{owner}/{name}")
    except FinetuneError as err:
        if err.http_status in (403, 404):
            raise
        user.session.flash = {"kind": "bad", "text": f"Not deleted: {err}"}
        return RedirectResponse(f"/models/{owner}/{name}/settings", status_code=303)
    user.session.flash = {"kind": "ok", "text": f"Deleted {owner}/{name}."}
    return RedirectResponse("/", status_code=303)


# ---------------------------------------------------------------- uploads
def upload_rows(request: Request, account: str) -> list[dict[str, Any]]:
    """The account's uploads, newest first, each by its own name (with its sha256 where two share a name) and
    the trainings that read it."""
    files = services.list_files(request, account)
    readers: dict[str, list[Any]] = {}
    for record in user_records(registry(request), account):
        data = (record.input or {}).get("data") or {}
        for value in {data.get("path"), data.get("eval")}:
            if isinstance(value, str):
                readers.setdefault(value, []).append(record)
    names = [f.name for f in files]
    rows = []
    for f in files:
        using = readers.get(upload_ref(f.id), [])
        rows.append({"id": f.id, "name": f.name, "size": size(f.size), "sha": f.sha256[:12],
                     "same_name": names.count(f.name) > 1, "created": when_short(f.created_at),
                     "trainings": len(using), "busy": [r.id for r in using if r.status not in FINAL]})
    return rows


@router.get("/uploads")
def uploads_page(request: Request, user: User) -> Response:
    return render(request, "uploads.html", {"title": "Uploads", "nav": "uploads",
                                            "uploads": upload_rows(request, user.account)}, user=user)


@router.post("/uploads/{file_id}/delete")
def delete_upload(request: Request, user: User, form: Form, file_id: str) -> Response:
    """Delete an upload as ``DELETE /v1/files/{id}`` does (refused while a waiting or running training reads it)."""
    try:
        stored = services.delete_file(request, user.account, file_id)
    except FinetuneError as err:
        if err.http_status == 404:
            raise
        user.session.flash = {"kind": "bad", "text": f"Not deleted: {err}"}
    else:
        user.session.flash = {"kind": "ok", "text": f"Deleted {stored.name}."}
    return RedirectResponse("/uploads", status_code=303)
