"""The Train tab: pick the trainer and the data (upload or pick an uploaded file, previewed as training renders
it), set the common settings (defaults from the config dataclasses) plus any others as YAML, and submit.

Submitting goes through the API's own path for creating a training (access check, config check,
``submit_training``, the queue), so a training started here is the same object as one started with the API.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from ..data.formats import FORMATS
from ..errors import FinetuneError, LimitError, UsageError
from ..server import access
from . import services
from .core import render, router, templates
from .pages import Form, User, model_context, registry
from .preview import Preview, preview_data
from .train_form import SETTINGS, check_input, default_form, form_input
from .views import size, trainer_choices


def _train_context(request: Request, user: Any, owner: str, name: str, form: dict[str, str] | None = None,
                   errors: dict[str, list[str]] | None = None, preview: Preview | None = None) -> dict[str, Any]:
    reg = registry(request)
    ctx = model_context(request, user, f"{owner}/{name}", "train")
    groups, default = trainer_choices(reg, access.visible_models(reg, user.account), ctx["model"]["model"])
    form = form or {**default_form(), "base_model": default or "", "data_upload": ""}
    files = [{"id": f.id, "name": f.name, "size": size(f.size)} for f in services.list_files(request, user.account)]
    ctx.update(form=form, errors=errors or {}, trainers=groups, uploads=files, formats=FORMATS, settings=SETTINGS,
               preview=preview)
    return ctx


@router.get("/models/{owner}/{name}/train")
def train_tab(request: Request, user: User, owner: str, name: str) -> Response:
    return render(request, "tab_train.html", _train_context(request, user, owner, name), user=user)


@router.post("/uploads")
async def upload(request: Request, user: User, form: Form) -> Response:
    """Store an uploaded data file for the signed-in account (the API's file store); JSON for the page."""
    file = form.get("file")
    if file is None or not getattr(file, "filename", None):
        raise UsageError("no file in the upload", "choose a file")
    info = await services.store(request, user.account, file)
    return JSONResponse({"id": info.id, "name": info.name, "size": size(info.size)}, status_code=201)


def _tokenizer_for(request: Request, ref: str) -> Any:
    """The trainer's tokenizer, for rendering chat data with its template; None if it cannot be loaded."""
    try:
        from ..modeling.load import load_tokenizer
        from ..registry.sources import resolve_model

        return load_tokenizer(resolve_model(registry(request), ref).base)
    except Exception:  # a preview without the template is still useful; training reports the real problem
        return None


def _preview(request: Request, user: User, form: dict[str, Any]) -> Preview | None:
    file_id = str(form.get("data_upload") or "")
    if not file_id:
        return None
    stored = services.file_of(request, user.account, file_id)
    fmt = str(form.get("data.format") or "auto")
    trainer = str(form.get("base_model") or "")
    first = preview_data(str(stored.path), fmt, label=stored.name)
    if first.format == "messages" and not first.error and trainer:
        tokenizer = _tokenizer_for(request, trainer)
        if tokenizer is not None:
            return preview_data(str(stored.path), fmt, tokenizer, label=stored.name)
    return first


@router.post("/models/{owner}/{name}/train/preview")
def train_preview(request: Request, user: User, form: Form, owner: str, name: str) -> Response:
    """The data preview fragment (HTML) under the picker."""
    model_context(request, user, f"{owner}/{name}", "train")  # access: 404 for a hidden model
    preview = _preview(request, user, form)
    if preview is None:
        return HTMLResponse("")
    return templates.TemplateResponse(request, "_preview.html", {"preview": preview})


@router.post("/models/{owner}/{name}/train")
async def start_training(request: Request, user: User, form: Form, owner: str, name: str) -> Response:
    """Check the form as the API checks a training's input and start it; each problem next to its field."""
    reg = registry(request)
    destination = access.owned_model(reg, user.account, f"{owner}/{name}", "train into").full_name
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    file = form.get("data_file")
    if file is not None and getattr(file, "filename", None):  # a browser without JavaScript uploads here
        values["data_upload"] = (await services.store(request, user.account, file)).id
    raw, errors = form_input(values, values.get("data_upload") or None)
    trainer = None
    try:
        trainer = access.visible_version(reg, user.account, *_split_ref(values.get("base_model", "")))
    except FinetuneError as err:
        errors.add("base_model", str(err))
    config = None
    if trainer is not None:
        config = check_input(raw, errors, lambda r: services.training_config(request, user.account, r, trainer.ref))
    preview = None
    if values.get("data_upload"):
        try:
            preview = _preview(request, user, values)
        except FinetuneError as err:
            errors.add("data.path", str(err))
        if preview is not None and preview.error:
            errors.add("data.path", preview.error)
    if errors or config is None:
        ctx = _train_context(request, user, owner, name, values, errors, preview)
        return render(request, "tab_train.html", ctx, status_code=422, user=user)
    try:
        record = services.start_training(request, user.account, config, destination)
    except LimitError as err:  # the account's trainings at the server's cap: said above the form, kept filled
        errors.add("_form", str(err))
        ctx = _train_context(request, user, owner, name, values, errors, preview)
        return render(request, "tab_train.html", ctx, status_code=err.http_status, user=user)
    return RedirectResponse(f"/trainings/{record.id}", status_code=303)


def _split_ref(ref: str) -> tuple[str, str]:
    model, _, selector = ref.partition(":")
    return model, selector or "latest"
