"""Wire objects: registry objects as the JSON that Replicate's API returns (and its client parses).

Every field Replicate's model, version and training objects have is present; ours are added beside them (a version's
``number``, ``model``, ``kind``, ``parent``, ``metrics``, ``base``). The API and the web app build their views
from these functions, so both say the same thing.
"""

from __future__ import annotations

import os
from typing import Any

from .. import __version__
from ..errors import FinetuneError
from ..registry import Model, Registry, Version
from ..registry.accounts import Account
from ..registry.files import StoredFile
from ..registry.jobs import TrainingRecord
from ..serving import schema as _schema

GENERATION_DEFAULTS = _schema.GENERATION_DEFAULTS
COG_VERSION = f"finetune-{__version__}"  # not a Cog version: we do not use Cog; the client accepts any string


def account_object(account: Account) -> dict[str, Any]:
    """``GET /v1/account``."""
    return {"type": "user", "username": account.username, "name": account.username, "github_url": None}


def model_object(model: Model, latest: Version | None, base_url: str) -> dict[str, Any]:
    """A model as ``GET /v1/models/{owner}/{name}`` returns it, ``latest_version`` embedded."""
    return {
        "url": f"{base_url}/models/{model.owner}/{model.name}",  # its page in the web app
        "owner": model.owner,
        "name": model.name,
        "description": model.description or None,
        "visibility": model.visibility,
        **model.links,
        "run_count": 0,
        "default_example": None,
        "latest_version": version_object(latest) if latest is not None else None,
        # ours
        "hardware": model.hardware,
        "created_at": model.created_at,
        "readme": model.readme or None,
    }


def is_chat(version: Version) -> bool:
    """Whether a version was trained on chat messages (it then takes ``messages`` and ``system_prompt``)."""
    fmt = version.metadata.get("prompt_format")
    return isinstance(fmt, dict) and fmt.get("name") == "messages"


def public_lineage(entry: Any) -> Any:
    """A parent or base as other accounts may read it: a registry ref or a hub id as it is; a folder of the
    server by its folder name and content hash, never its path (public versions are read by every account)."""
    if isinstance(entry, dict) and "local_path" in entry:
        name = str(entry["local_path"]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return {"local_folder": name, **({"sha256": entry["sha256"]} if entry.get("sha256") else {})}
    return entry


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A version's manifest as the weights archive serves it: lineage and import source naming a folder of the
    server by its name (see :func:`public_lineage`), never its path. Its ``id`` still names the version on the
    server; ``withheld`` lists the fields changed, so a client that re-hashes the manifest knows why it differs."""
    out, meta = dict(manifest), dict(manifest.get("metadata") or {})
    withheld = []
    for holder, key, field in ((out, "parent", "parent.local_path"), (meta, "base", "metadata.base.local_path")):
        if public_lineage(holder.get(key)) != holder.get(key):
            holder[key] = public_lineage(holder[key])
            withheld.append(field)
    source = meta.get("source")
    if isinstance(source, dict) and source.get("type") == "local" and "path" in source:
        folder = str(source["path"]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        meta["source"] = {**{k: v for k, v in source.items() if k != "path"}, "folder": folder}
        withheld.append("metadata.source.path")
    if withheld:
        out["metadata"], out["withheld"] = meta, withheld
    return out


def version_object(version: Version) -> dict[str, Any]:
    """A version as ``GET /v1/models/{o}/{n}/versions/{id}`` returns it."""
    meta = version.metadata
    base = meta.get("base")
    if base is None and version.kind == "base":
        base = {"ref": version.ref, "id": version.id}
    return {
        "id": version.id,
        "created_at": version.created_at,
        "cog_version": COG_VERSION,
        "openapi_schema": openapi_schema(chat=is_chat(version)),
        # ours
        "model": version.model,
        "number": version.number,
        "kind": version.kind,
        "parent": public_lineage(version.parent),
        "metrics": meta.get("metrics", {}),
        "base": public_lineage(base),
        "training_id": meta.get("training_id"),
    }


def openapi_schema(chat: bool) -> dict[str, Any]:
    """The version's ``openapi_schema``: the JSON schema of its input model (:mod:`finetune.serving.inputs`),
    the same model that checks a prediction's input (:func:`finetune.serving.schema.check_input`)."""
    return _schema.openapi_schema(chat)


def file_object(stored: StoredFile, base_url: str) -> dict[str, Any]:
    """An uploaded file as ``POST /v1/files`` and ``GET /v1/files/{id}`` return it (Replicate's fields).
    ``urls.get`` is what a training input names as data; ``urls.download`` serves the bytes (owner only)."""
    url = f"{base_url}/v1/files/{stored.id}"
    return {
        "id": stored.id,
        "name": stored.name,
        "content_type": stored.content_type,
        "size": stored.size,
        "etag": stored.sha256,
        "checksums": {"sha256": stored.sha256},
        "metadata": stored.metadata,
        "created_at": stored.created_at,
        "expires_at": None,
        "urls": {"get": url, "download": f"{url}/download"},
    }


# ---------------------------------------------------------------------------------------------- trainings
_LOG_LIMIT = 1 << 20  # a training object carries at most the last MiB of its log


def weights_url(version: Version, base_url: str) -> str:
    """Where a version's files download as one tar archive (``GET .../versions/{id}/weights``)."""
    owner, name = version.model.split("/", 1)
    return f"{base_url}/v1/models/{owner}/{name}/versions/{version.id}/weights"


def _trainer(reg: Registry, record: TrainingRecord) -> tuple[str, str]:
    """``(owner/name, version id)`` of the version a training started from, when it is in the registry
    (``base_model`` may also be a hub id or a folder: then that, and no id)."""
    base = str(record.input.get("base_model") or "")
    for ref in (record.model, base):
        if ref and ":" in ref and not ref.startswith(("/", ".")):
            try:
                version = reg.resolve(ref)
            except (FinetuneError, OSError, ValueError):
                continue
            return version.model, version.id
    return record.model or base, ""


def _logs(reg: Registry, training_id: str) -> str:
    path = reg.training_paths(training_id).log
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _LOG_LIMIT))
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def training_object(reg: Registry, record: TrainingRecord, base_url: str) -> dict[str, Any]:
    """A training as ``GET /v1/trainings/{id}`` returns it (and webhooks send it)."""
    model, version_id = _trainer(reg, record)
    output: dict[str, Any] | None = None
    if record.output and record.output.get("version"):
        try:
            published = reg.resolve(record.output["version"])
            output = {"version": f"{published.model}:{published.id}", "weights": weights_url(published, base_url)}
        except (FinetuneError, OSError, ValueError):  # deleted since
            output = {"version": record.output["version"], "weights": None}
    url = f"{base_url}/v1/trainings/{record.id}"
    return {
        "id": record.id,
        "model": model,
        "version": version_id,
        "destination": record.destination,
        "status": str(record.status),
        "input": record.input,
        "output": output,
        "logs": _logs(reg, record.id),
        "error": record.error,
        "metrics": record.metrics,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "completed_at": record.completed_at,
        "urls": {"get": url, "cancel": f"{url}/cancel", "web": f"{base_url}/trainings/{record.id}"},
        # ours
        "source": record.source,
        "webhook": record.webhook,
        "webhook_events_filter": record.webhook_events_filter,
        "placement": record.placement,  # where a cluster ran it (host, node id, attempts); None: this machine
    }
