"""``/v1/models``: create, list, get, edit and delete destination models."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict

from ...errors import AlreadyExistsError
from ...registry import Model, Registry
from .. import access
from ..auth import AccountDep, current_account
from ..context import RegistryDep, SettingsDep, VersionJSONDep, base_url
from ..hardware import normalize_hardware
from ..objects import model_object
from ..pagination import page
from ..responses import Raw, json_response
from ..wire_cache import VersionJSON

router = APIRouter(prefix="/v1", dependencies=[Depends(current_account)], tags=["models"])


class ModelCreate(BaseModel):
    """The body of ``POST /v1/models`` (Replicate's fields)."""

    model_config = ConfigDict(extra="forbid")
    owner: str
    name: str
    visibility: Literal["public", "private"] = "private"
    hardware: str = "auto"
    description: str | None = None
    github_url: str | None = None
    paper_url: str | None = None
    license_url: str | None = None
    cover_image_url: str | None = None


class ModelUpdate(BaseModel):
    """The body of ``PATCH /v1/models/{owner}/{name}``: only the fields sent change; ``null`` clears a link.
    ``visibility`` is ours (Replicate changes it on its web page only)."""

    model_config = ConfigDict(extra="forbid")
    visibility: Literal["public", "private"] | None = None
    description: str | None = None
    readme: str | None = None
    github_url: str | None = None
    paper_url: str | None = None
    license_url: str | None = None
    cover_image_url: str | None = None


def _model_json(reg: Registry, cache: VersionJSON, model: Model, base: str) -> dict[str, Any]:
    """The model object with its latest version (serialized once, from the cache) embedded."""
    obj = model_object(model, None, base)
    latest = reg.latest(model.full_name)
    data = cache.get(reg, model, latest.number) if latest is not None else None
    obj["latest_version"] = Raw(data) if data is not None else None
    return obj


@router.post("/models", status_code=201)
def create_model(body: ModelCreate, account: AccountDep, reg: RegistryDep, request: Request) -> Response:
    """Create a model under the token's own owner name; 409 if it exists."""
    access.check_create(account, body.owner)
    name = f"{body.owner}/{body.name}"
    links = {k: getattr(body, k) for k in ("github_url", "paper_url", "license_url", "cover_image_url")}
    try:
        model = reg.create_model(name, description=body.description or "", visibility=body.visibility,
                                 hardware=normalize_hardware(body.hardware), **links)
    except AlreadyExistsError:
        raise AlreadyExistsError(f"model {name} already exists") from None
    return json_response(model_object(model, None, base_url(request)), status_code=201)


@router.get("/models")
def list_models(account: AccountDep, reg: RegistryDep, settings: SettingsDep, cache: VersionJSONDep,
                request: Request) -> Response:
    """The models the account may see (its own and public ones), by name, paginated."""
    models = {m.full_name: m for m in access.visible_models(reg, account)}
    base = base_url(request)
    return json_response(page(request, list(models), lambda name: _model_json(reg, cache, models[name], base),
                              descending=False, page_size=settings.page_size))


@router.get("/models/{owner}/{name}")
async def get_model(owner: str, name: str, account: AccountDep, reg: RegistryDep, cache: VersionJSONDep,
              request: Request) -> Response:
    """One model, its latest version embedded."""
    model = access.visible_model(reg, account, f"{owner}/{name}")
    return json_response(_model_json(reg, cache, model, base_url(request)))


@router.patch("/models/{owner}/{name}")
def update_model(owner: str, name: str, body: ModelUpdate, account: AccountDep, reg: RegistryDep,
                 cache: VersionJSONDep, request: Request) -> Response:
    """Change description, readme, links or visibility (owner only)."""
    model = edit_model(reg, account, f"{owner}/{name}", {k: getattr(body, k) for k in body.model_fields_set})
    return json_response(_model_json(reg, cache, model, base_url(request)))


def edit_model(reg: Registry, account: Any, name: str, changes: dict[str, Any]) -> Model:
    """Apply a model's edits (owner only): its text fields through ``update_model``, its visibility through
    ``set_visibility``; the API's PATCH and the web app's settings form both call this."""
    model = access.owned_model(reg, account, name, "edit")
    changes = dict(changes)
    visibility = changes.pop("visibility", None)
    if changes:
        model = reg.update_model(model.full_name, **changes)
    if visibility is not None and visibility != model.visibility:
        model = reg.set_visibility(model.full_name, visibility)
    return model


@router.delete("/models/{owner}/{name}", status_code=204)
def delete_model(owner: str, name: str, account: AccountDep, reg: RegistryDep) -> Response:
    """Delete a model (owner only); 409 while it has versions, as on Replicate."""
    remove_model(reg, account, f"{owner}/{name}")
    return Response(status_code=204)


def remove_model(reg: Registry, account: Any, name: str) -> None:
    """Delete a model (owner only) with the registry's guards; the API and the web app both call this."""
    model = access.owned_model(reg, account, name, "delete")
    reg.delete_model(model.full_name)
