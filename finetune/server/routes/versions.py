"""``/v1/models/{owner}/{name}/versions``: list, get and delete versions (trainings publish them)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from ...errors import VersionNotFoundError
from .. import access
from ..auth import AccountDep, current_account
from ..context import RegistryDep, SettingsDep, VersionIndexDep, VersionJSONDep
from ..pagination import page
from ..responses import Raw, json_response

router = APIRouter(prefix="/v1", dependencies=[Depends(current_account)], tags=["versions"])


@router.get("/models/{owner}/{name}/versions")
async def list_versions(owner: str, name: str, account: AccountDep, reg: RegistryDep, settings: SettingsDep,
                  cache: VersionJSONDep, request: Request) -> Response:
    """The model's versions, newest first, paginated; only the page's manifests are read, once."""
    model = access.visible_model(reg, account, f"{owner}/{name}")

    def load(number: int) -> Raw | None:
        data = cache.get(reg, model, number)
        return Raw(data) if data is not None else None

    numbers = reg.version_numbers(model.full_name)
    return json_response(page(request, numbers, load, descending=True, page_size=settings.page_size))


@router.get("/models/{owner}/{name}/versions/{version_id}")
async def get_version(owner: str, name: str, version_id: str, account: AccountDep, reg: RegistryDep,
                index: VersionIndexDep, cache: VersionJSONDep) -> Response:
    """One version by its id (or any ref selector: number, alias, id prefix)."""
    model = access.visible_model(reg, account, f"{owner}/{name}")
    version = access.visible_version(reg, account, model.full_name, version_id, index)
    data = cache.get(reg, model, version.number)
    if data is None:  # deleted or damaged since it was found
        raise VersionNotFoundError(f"version {version_id} of {model.full_name} not found")
    return json_response(Raw(data))


@router.delete("/models/{owner}/{name}/versions/{version_id}", status_code=204)
def delete_version(owner: str, name: str, version_id: str, account: AccountDep, reg: RegistryDep,
                   index: VersionIndexDep) -> Response:
    """Delete a version (owner only); refused (409) while an alias or a child version needs it."""
    version = access.owned_version(reg, account, f"{owner}/{name}", version_id, index, "delete versions of")
    reg.delete_version(version.ref)
    return Response(status_code=204)
