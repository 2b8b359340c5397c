"""The Train tab: pick the start point and the data (upload or pick an uploaded file, previewed as training
renders it), set the common settings (defaults from the config dataclasses) plus any others as YAML, and submit.

The tab of a model you train *into* (yours, holding no base) starts from any version you may see; the tab of a
model you train *from* (a base, or someone's public model) asks for a destination: one of yours, or a new one
created with the training (see :mod:`.start_points`). Submitting goes through the API's own path for creating a
training (access check, config check, ``submit_training``, the queue), so a training started here is the same
object as one started with the API. A refused form comes back with every problem at its field, a summary of
them at its top, and the user's inputs and upload kept.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from ..choices import FORMATS
from ..errors import FinetuneError, LimitError, UsageError
from ..registry import VISIBILITIES
from ..registry.files import upload_id
from ..server import access
from . import services
from .core import render, router, templates
from .live import owned_training
from .pages import Form, User, create_checked_model, model_context, new_model_problems, registry
from .preview import Preview, preview_data
from .start_points import (
    NEW_DESTINATION,
    default_destination,
    default_start,
    destinations,
    note,
    receives_trainings,
    trainer_choices,
)
from .train_form import SETTINGS, FormErrors, check_input, default_form, form_from_config, form_input
from .views import size, when_short

# Where each error key's field is (for the error summary's links)
FIELD_IDS = {"base_model": "base_model", "data.path": "data_upload", "data.format": "data_format",
             "advanced": "advanced", "destination": "destination", "destination_name": "destination_name",
             "destination_visibility": "destination_visibility"}


def upload_choices(request: Request, account: str) -> list[dict[str, str]]:
    """The account's uploads for a picker, newest first, by their own names (the upload date where two files
    share a name)."""
    files = services.list_files(request, account)
    names = [f.name for f in files]
    return [{"id": f.id, "name": f.name, "size": size(f.size),
             "when": when_short(f.created_at) if names.count(f.name) > 1 else ""} for f in files]


def _mode(request: Request, user: Any, model: Any) -> str:
    """``into`` (the user trains into this model), ``from`` (trains from it into another), or ``none``."""
    reg = registry(request)
    if receives_trainings(reg, user.account, model):
        return "into"
    return "from" if reg.latest(model.full_name) is not None else "none"


def _train_context(request: Request, user: Any, owner: str, name: str, form: dict[str, str] | None = None,
                   errors: dict[str, list[str]] | None = None, preview: Preview | None = None,
                   notice: str | None = None) -> dict[str, Any]:
    reg = registry(request)
    ctx = model_context(request, user, f"{owner}/{name}", "train")
    model = ctx["model_obj"]
    mode = _mode(request, user, model)
    visible = access.visible_models(reg, user.account) if mode == "into" else [model]
    groups = trainer_choices(reg, visible, model.full_name)
    offered = {v.ref for _, versions in groups for v in versions}
    form = dict(form or {**default_form(), "data_upload": ""})
    if form.get("base_model") and form["base_model"] not in offered:
        chosen = _resolve(reg, form["base_model"])
        if chosen is not None and access.can_read(user.account, reg.get_model(chosen.model)):
            groups.insert(0, (chosen.model, [chosen]))  # an older version than the choices list (train again)
            offered.add(chosen.ref)
        elif not errors:
            notice = (notice or "") + f" Its start point {form['base_model']} is gone; choose another."
            form["base_model"] = ""
    if not form.get("base_model"):
        form["base_model"] = (default_start(reg, user.account, model.full_name, offered) if mode == "into"
                              else (groups[0][1][0].ref if groups else "")) or ""
    own = destinations(reg, user.account) if mode == "from" else []
    if mode == "from" and "destination" not in form:
        form["destination"] = default_destination(reg, user.account, model.full_name, own)
    trainers = [(group, [{"ref": v.ref, "kind": v.kind, "note": note(reg, v.ref)} for v in versions])
                for group, versions in groups]
    order = ["_form", "destination", "destination_name", "destination_visibility", "base_model", "data.path",
             "data.format", *(key for key, _, _ in SETTINGS), "advanced"]  # the page's order, for the summary
    errors = dict(sorted((errors or {}).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    ctx.update(mode=mode, form=form, errors=errors, trainers=trainers, start_note=note(reg, form["base_model"]),
               destinations=own, new_destination=NEW_DESTINATION, visibilities=VISIBILITIES,
               uploads=upload_choices(request, user.account), formats=FORMATS, settings=SETTINGS, preview=preview,
               field_ids=FIELD_IDS, notice=notice.strip() if notice else None)
    return ctx


def _resolve(reg: Any, ref: str) -> Any:
    try:
        return reg.resolve(ref)
    except (FinetuneError, ValueError):
        return None


@router.get("/models/{owner}/{name}/train")
def train_tab(request: Request, user: User, owner: str, name: str, again: str = "") -> Response:
    """The form; ``?again=TRAINING_ID`` fills it with that training's start point, data and settings."""
    form, notice = None, None
    if again:
        record = owned_training(request, user, again)
        file_id = upload_id((record.input.get("data") or {}).get("path"))
        if file_id is not None and not any(f.id == file_id for f in services.list_files(request, user.account)):
            notice, file_id = "Its data file was deleted since: upload it again.", None
        form = form_from_config(record.input, file_id or "")
        notice = f"The settings of training {record.id}." + (f" {notice}" if notice else "")
    ctx = _train_context(request, user, owner, name, form, notice=notice)
    return render(request, "tab_train.html", ctx, user=user)


@router.post("/uploads")
async def upload(request: Request, user: User, form: Form) -> Response:
    """Store an uploaded data file for the signed-in account (the API's file store); JSON for the page."""
    file = form.get("file")
    if file is None or not getattr(file, "filename", None):
        raise UsageError("no file in the upload", "choose a file")
    info = await services.store_once(request, user.account, file)
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
    if first.format in ("messages", "preference") and not first.error and trainer:
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


def _destination(request: Request, user: Any, values: dict[str, str], errors: FormErrors) -> dict[str, str] | None:
    """The destination a training *from* a model goes to: ``{"name": owner/name}``, plus the new model's fields
    when it is to be created; None (and the problem at its field) when the choice is not usable."""
    choice = values.get("destination", "")
    if choice == NEW_DESTINATION:
        fields = {"owner": user.account, "name": values.get("destination_name", "").strip(),
                  "visibility": values.get("destination_visibility") or "private", "hardware": "auto"}
        problems = new_model_problems(user.account, fields)
        for key in ("name", "visibility"):
            for message in problems.get(key, []):
                errors.add(f"destination_{key}", message)
        full = f"{user.account}/{fields['name']}"
        if not problems and any(m.full_name == full for m in registry(request).list_models()):
            errors.add("destination_name", f"model {full} already exists — choose it in the list instead")
            return None
        return None if problems else {**fields, "full_name": full}
    if choice in destinations(registry(request), user.account):
        return {"full_name": choice}
    errors.add("destination", "choose where the new version goes: one of your models, or a new one")
    return None


@router.post("/models/{owner}/{name}/train")
async def start_training(request: Request, user: User, form: Form, owner: str, name: str) -> Response:
    """Check the form as the API checks a training's input and start it; each problem next to its field."""
    reg = registry(request)
    model = access.visible_model(reg, user.account, f"{owner}/{name}")
    mode = _mode(request, user, model)
    if mode == "none":
        raise UsageError(f"{model.full_name} has no version to train from yet")
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    file = form.get("data_file")
    if file is not None and getattr(file, "filename", None):  # a browser without JavaScript uploads here
        values["data_upload"] = (await services.store_once(request, user.account, file)).id
    raw, errors = form_input(values, values.get("data_upload") or None)
    destination = {"full_name": model.full_name} if mode == "into" else _destination(request, user, values, errors)
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

    def refused(status: int = 422) -> Response:
        ctx = _train_context(request, user, owner, name, values, errors, preview)
        return render(request, "tab_train.html", ctx, status_code=status, user=user)

    if errors or config is None or destination is None:
        return refused()
    if "owner" in destination:  # a new destination model, created with the training
        for key, messages in create_checked_model(reg, destination).items():
            for message in messages:
                errors.add(f"destination_{key}" if key in ("name", "visibility") else "_form", message)
        if errors:
            return refused()
        values["destination"] = destination["full_name"]  # it exists now: a refusal below keeps it chosen
    try:
        record = services.start_training(request, user.account, config, destination["full_name"])
    except LimitError as err:  # the account's trainings at the server's cap: said above the form, kept filled
        errors.add("_form", str(err))
        return refused(err.http_status)
    except FinetuneError as err:  # the destination cannot receive it (a base landed there meanwhile)
        errors.add("destination" if mode == "from" else "_form", str(err))
        return refused(err.http_status)
    return RedirectResponse(f"/trainings/{record.id}", status_code=303)


def _split_ref(ref: str) -> tuple[str, str]:
    model, _, selector = ref.partition(":")
    return model, selector or "latest"
