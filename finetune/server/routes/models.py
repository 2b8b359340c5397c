"""``/v1/models``: create, list, get, edit and delete destination models."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict

from ...errors import AlreadyExistsError
from .. import access
from ..auth import AccountDep, current_account
from ..context import RegistryDep, SettingsDep, base_url
from ..hardware import normalize_hardware
from ..objects import model_object
from ..pagination import page

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
    """The body of ``PATCH /v1/models/{owner}/{name}``: only the fields sent change; ``null`` clears a link."""

    model_config = ConfigDict(extra="forbid")
    description: str | None = None
    readme: str | None = None
    github_url: str | None = None
    paper_url: str | None = None
    license_url: str | None = None
    cover_image_url: str | None = None


@router.post("/models", status_code=201)
def create_model(body: ModelCreate, account: AccountDep, reg: RegistryDep, request: Request) -> dict[str, Any]:
    """Create a model under the token's own owner name; 409 if it exists."""
    access.check_create(account, body.owner)
    name = f"{body.owner}/{body.name}"
    links = {k: getattr(body, k) for k in ("github_url", "paper_url", "license_url", "cover_image_url")}
    try:
        model = reg.create_model(name, description=body.description or "", visibility=body.visibility,
                                 hardware=normalize_hardware(body.hardware), **links)
    except AlreadyExistsError:
        raise AlreadyExistsError(f"model {name} already exists") from None
    return model_object(model, None, base_url(request))


@router.get("/models")
def list_models(account: AccountDep, reg: RegistryDep, settings: SettingsDep, request: Request) -> dict[str, Any]:
    """The models the account may see (its own and public ones), by name, paginated."""
    models = {m.full_name: m for m in access.visible_models(reg, account)}
    base = base_url(request)
    return page(request, list(models), lambda name: model_object(models[name], reg.latest(name), base),
                descending=False, page_size=settings.page_size)


@router.get("/models/{owner}/{name}")
def get_model(owner: str, name: str, account: AccountDep, reg: RegistryDep, request: Request) -> dict[str, Any]:
    """One model, its latest version embedded."""
    model = access.visible_model(reg, account, f"{owner}/{name}")
    return model_object(model, reg.latest(model.full_name), base_url(request))


@router.patch("/models/{owner}/{name}")
def update_model(owner: str, name: str, body: ModelUpdate, account: AccountDep, reg: RegistryDep,
                 request: Request) -> dict[str, Any]:
    """Change description, readme or links (owner only)."""
    model = access.owned_model(reg, account, f"{owner}/{name}", "edit")
    changes = {k: getattr(body, k) for k in body.model_fields_set}
    if changes:
        model = reg.update_model(model.full_name, **changes)
    return model_object(model, reg.latest(model.full_name), base_url(request))


@router.delete("/models/{owner}/{name}", status_code=204)
def delete_model(owner: str, name: str, account: AccountDep, reg: RegistryDep) -> Response:
    """Delete a model (owner only); 409 while it has versions, as on Replicate."""
    model = access.owned_model(reg, account, f"{owner}/{name}", "delete")
    reg.delete_model(model.full_name)
    return Response(status_code=204)
