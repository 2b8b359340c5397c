"""``/v1/models/{owner}/{name}/versions``: list, get and delete versions (trainings publish them)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from .. import access
from ..auth import AccountDep, current_account
from ..context import RegistryDep, SettingsDep, VersionIndexDep
from ..objects import version_object
from ..pagination import page

router = APIRouter(prefix="/v1", dependencies=[Depends(current_account)], tags=["versions"])


@router.get("/models/{owner}/{name}/versions")
def list_versions(owner: str, name: str, account: AccountDep, reg: RegistryDep, settings: SettingsDep,
                  request: Request) -> dict[str, Any]:
    """The model's versions, newest first, paginated; only the page's manifests are read."""
    model = access.visible_model(reg, account, f"{owner}/{name}")
    numbers = [v.number for v in reg.list_versions(model.full_name)]

    def load(number: int) -> dict[str, Any] | None:
        version = reg.version(model.full_name, number)
        return version_object(version) if version is not None else None

    return page(request, numbers, load, descending=True, page_size=settings.page_size)


@router.get("/models/{owner}/{name}/versions/{version_id}")
def get_version(owner: str, name: str, version_id: str, account: AccountDep, reg: RegistryDep,
                index: VersionIndexDep) -> dict[str, Any]:
    """One version by its id (or any ref selector: number, alias, id prefix)."""
    return version_object(access.visible_version(reg, account, f"{owner}/{name}", version_id, index))


@router.delete("/models/{owner}/{name}/versions/{version_id}", status_code=204)
def delete_version(owner: str, name: str, version_id: str, account: AccountDep, reg: RegistryDep,
                   index: VersionIndexDep) -> Response:
    """Delete a version (owner only); refused (409) while an alias or a child version needs it."""
    version = access.owned_version(reg, account, f"{owner}/{name}", version_id, index, "delete versions of")
    reg.delete_version(version.ref)
    return Response(status_code=204)
