"""Trainings: ``POST /v1/models/{o}/{n}/versions/{id}/trainings``, ``GET /v1/trainings[/{id}]``,
``POST /v1/trainings/{id}/cancel``, and a version's weights as one archive.

The trainer is the version in the path (a base, or a fine-tune to continue); ``input`` holds the training
config's own keys (``data``, ``lora``, ``train``, or dotted keys such as ``"train.max_steps"``), checked exactly
as a YAML config is. The record is written (durably) before the 201 goes out; the queue runs it.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from ...config import Config, config_from_dict
from ...errors import ConfigError, FinetuneError, ModelNotFoundError, TrainingNotFoundError, UsageError
from ...registry import Registry
from ...registry.jobs import TrainingRecord, Trainings
from ...registry.manifest import MANIFEST
from ...serving.inputs import WebhookOptions
from .. import access
from ..archive import tar_stream
from ..auth import AccountDep, current_account
from ..context import RegistryDep, SettingsDep, VersionIndexDep, base_url, webhook_policy
from ..data_sources import is_number, resolve_data_input
from ..objects import public_manifest, training_object
from ..pagination import page
from ..settings import ServerSettings
from ..training_service import TrainingService
from ..webhooks import check_webhook

router = APIRouter(prefix="/v1", dependencies=[Depends(current_account)], tags=["trainings"])

MISSING_DESTINATION = "The specified training destination does not exist"  # Replicate's own words
MAX_KEY_LENGTH = 200
MAX_INPUT_BYTES = 64 << 10  # a training's input is a config: a few hundred bytes; data travels as uploads


class TrainingCreate(WebhookOptions):
    """The body of ``POST .../trainings``, as the ``replicate`` client sends it. ``input`` is the training
    config's sections or dotted keys, checked by the config's models (:mod:`finetune.config`)."""

    destination: str = Field(max_length=200)
    input: dict[str, Any] = {}


def _service(request: Request) -> TrainingService:
    service: TrainingService = request.app.state.trainings
    return service


# ---------------------------------------------------------------------------------------------- input
def _nest(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-4, "data": {...}}`` -> nested sections; problems name the input key."""
    problems: list[tuple[str, str]] = []  # (the input key, the problem)
    nested: dict[str, Any] = {}
    for key, value in raw.items():
        if not key or not all(key.split(".")) or len(key) > MAX_KEY_LENGTH:
            why = ("the key is empty" if not key else f"longer than {MAX_KEY_LENGTH} characters"
                   if len(key) > MAX_KEY_LENGTH else "a dotted key needs a name between every two dots")
            problems.append(("", f"input key {key[:MAX_KEY_LENGTH]!r}: not a config key ({why})"))
            continue
        if key == "base_model":
            problems.append((key, "input.base_model: the base is the version in the URL; train another version by "
                                  "POSTing to its /trainings"))
            continue
        if key == "destination":
            problems.append((key, "input.destination: give `destination` beside `input`, not inside it"))
            continue
        parts = key.split(".")
        node = nested
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parts[:depth + 1])
                problems.append((where, f"{where}: set both as a value and as a section"))
                break
        else:
            leaf = parts[-1]
            if isinstance(node.get(leaf), dict) and isinstance(value, dict):
                node[leaf] = {**node[leaf], **value}
            elif leaf in node:
                problems.append((key, f"{key}: set twice"))
            else:
                node[leaf] = value
    if problems:
        raise ConfigError(problems, source="input")
    return nested


def _data_source(value: Any, key: str, reg: Registry, account: Any, settings: ServerSettings) -> Any:
    """What the trainer reads for ``data.path`` / ``data.eval`` (see :mod:`..data_sources`); an error keeps its
    status (a foreign file 404, a server path outside the allow-list 403, another URL 422) and names ``key``."""
    if not isinstance(value, str) or not value or (key == "data.eval" and is_number(value)):
        return value  # a fraction for data.eval, or a wrong type the config check reports
    try:
        return resolve_data_input(value, account=account, registry=reg, settings=settings)
    except FinetuneError as err:
        named = type(err)(f"input: {key}: {err.message}", err.hint)
        named.fields = [{"field": key, "message": str(named)}]  # type: ignore[attr-defined]  # where a form shows it
        raise named from None


def training_config(raw_input: dict[str, Any], trainer_ref: str, request: Request, account: Any,
                    settings: ServerSettings) -> Config:
    """The checked config of a training of ``trainer_ref`` (its ``base_model``) with ``raw_input`` as the
    config's sections or dotted keys, data resolved for ``account``; the API and the web app both use it."""
    reg: Registry = request.app.state.registry
    size = len(json.dumps(raw_input, default=str))
    if size > MAX_INPUT_BYTES:
        raise UsageError(f"input: {size} bytes of JSON; a training's input may have at most {MAX_INPUT_BYTES}",
                         "upload data as a file (POST /v1/files) and pass its URL as data.path")
    nested = _nest(raw_input)
    data = nested.get("data")
    if isinstance(data, dict):
        for key in ("path", "eval"):
            if key in data:
                data[key] = _data_source(data[key], f"data.{key}", reg, account, settings)
    config = config_from_dict({"base_model": trainer_ref, **nested}, source="input")
    _service(request).check_limits(config)  # the server's step limit, at the key it bounds
    return config


# ---------------------------------------------------------------------------------------------- routes
def _visible_training(reg: Registry, account: Any, training_id: str) -> TrainingRecord:
    try:
        record = Trainings(reg).get(training_id)
    except (TrainingNotFoundError, UsageError):  # a malformed id names nothing, like an unknown one
        raise TrainingNotFoundError(f"training {training_id} not found") from None
    access.check_owns(account, record, "training", training_id)
    return record


@router.post("/models/{owner}/{name}/versions/{version_id}/trainings", status_code=201)
def create_training(owner: str, name: str, version_id: str, body: TrainingCreate, account: AccountDep,
                    reg: RegistryDep, settings: SettingsDep, index: VersionIndexDep,
                    request: Request) -> dict[str, Any]:
    """Train the version in the path into ``destination``: 201 with the training (status ``starting``)."""
    trainer = access.visible_version(reg, account, f"{owner}/{name}", version_id, index)
    try:
        destination = access.owned_model(reg, account, body.destination, "train into").full_name
    except ModelNotFoundError:
        raise ModelNotFoundError(MISSING_DESTINATION) from None
    webhook = body.webhook
    events: list[str] | None = list(body.webhook_events_filter) if body.webhook_events_filter is not None else None
    if webhook is None and body.webhook_completed:
        webhook, events = body.webhook_completed, ["completed"]
    check_webhook(webhook, events, webhook_policy(request))
    config = training_config(body.input, trainer.ref, request, account, settings)
    url = base_url(request)
    record = _service(request).submit(config, destination, webhook=webhook, webhook_events_filter=events,
                                      base_url=url)
    return training_object(reg, record, url)


@router.get("/trainings")
def list_trainings(account: AccountDep, reg: RegistryDep, settings: SettingsDep, request: Request) -> dict[str, Any]:
    """The account's trainings, newest first (CLI and API alike), paginated."""
    mine = {r.id: r for r in Trainings(reg).list() if access.owner_of(r) == account.username}
    url = base_url(request)
    return page(request, list(mine), lambda training_id: training_object(reg, mine[training_id], url),
                descending=True, page_size=settings.page_size)


@router.get("/trainings/{training_id}")
def get_training(training_id: str, account: AccountDep, reg: RegistryDep, request: Request) -> dict[str, Any]:
    return training_object(reg, _visible_training(reg, account, training_id), base_url(request))


@router.post("/trainings/{training_id}/cancel")
def cancel_training(training_id: str, account: AccountDep, reg: RegistryDep, request: Request) -> dict[str, Any]:
    """Cancel a queued or running training (it publishes nothing); an ended one is returned unchanged."""
    _visible_training(reg, account, training_id)
    record = _service(request).cancel(training_id)
    return training_object(reg, record, base_url(request))


@router.get("/models/{owner}/{name}/versions/{version_id}/weights")
def download_weights(owner: str, name: str, version_id: str, account: AccountDep, reg: RegistryDep,
                     index: VersionIndexDep) -> StreamingResponse:
    """The version's files (for an adapter: its PEFT folder) as one tar archive, streamed."""
    version = access.visible_version(reg, account, f"{owner}/{name}", version_id, index)
    reg.check(version)  # never hand out files that differ from the manifest
    stem = f"{owner}-{name}-{version.number}"
    public = public_manifest(version.manifest)  # no server folder paths, as in the API's version object
    replace = {MANIFEST: json.dumps(public, indent=2).encode() + b"\n"} if public != version.manifest else {}
    size, chunks = tar_stream(version.path, prefix=stem, replace=replace)
    return StreamingResponse(chunks, media_type="application/x-tar", headers={
        "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{stem}.tar"'})
