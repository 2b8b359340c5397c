"""Where a training starts and where it goes, as the Train tab and the training page say it.

- A model *receives* trainings when its owner trains into it and it holds no base (a base is its model's only
  version). Every model with a version can be *trained from*: the Train tab of a base, or of someone's public
  model, asks for a destination (one of yours, or a new one) and trains from that model.
- "Start from" defaults to what the user chose the last time they trained into the destination (read from
  their newest training record into it), else to the base its versions descend from: a retry never stacks on
  the previous run's adapter unless the user chose that.
- A start point is said plainly: "start from the base X" (a new adapter) or "continue from X" (its adapter
  trains further and is the new version's parent).

Everything here reads the registry's records and versions; nothing is stored for the web app alone.
"""

from __future__ import annotations

from typing import Any

from ..errors import FinetuneError
from ..registry import Model, Registry, Version
from ..registry.files import Files, upload_id
from ..registry.jobs import TrainingRecord, Trainings
from ..registry.lineage import lineage
from ..server import access

TRAINER_CHOICES = 20  # the newest versions offered per model; older ones are trained from with the API or CLI
NEW_DESTINATION = "__new__"  # the destination picker's "a new model" choice


def holds_base(reg: Registry, model: str) -> bool:
    """Whether ``model`` holds a base (then it is trained from, never into)."""
    return any(v.kind == "base" for v in reg.list_versions(model))


def receives_trainings(reg: Registry, account: str, model: Model) -> bool:
    """Whether ``account`` can train into ``model``: its own, and not holding a base."""
    return model.owner == account and not holds_base(reg, model.full_name)


def destinations(reg: Registry, account: str) -> list[str]:
    """The account's models that can receive trainings, by name."""
    return [m.full_name for m in reg.list_models() if receives_trainings(reg, account, m)]


def trainer_choices(reg: Registry, models: list[Model], this_model: str) -> list[tuple[str, list[Version]]]:
    """The "start from" choices, grouped by model (``this_model`` first), newest versions first."""
    groups = []
    for m in sorted(models, key=lambda m: (m.full_name != this_model, m.full_name)):
        versions = reg.list_versions(m.full_name)[:TRAINER_CHOICES]
        if versions:
            groups.append((m.full_name, versions))
    return groups


def _version(reg: Registry, ref: str) -> Version | None:
    try:
        return reg.resolve(ref)
    except (FinetuneError, ValueError):
        return None


def root_base(reg: Registry, version: Version) -> Version | None:
    """The base ``version`` descends from (itself for a base); None when its lineage is broken."""
    try:
        root = lineage(reg, version)[-1]
    except FinetuneError:
        return None
    return root if root.kind == "base" else None


def note(reg: Registry, ref: str) -> str:
    """What starting from ``ref`` means, in the words the form and the training page use."""
    version = _version(reg, ref)
    if version is None:
        return f"start from {ref}" if ref else ""
    if version.kind == "base":
        return f"start from the base {version.ref} (a new adapter)"
    return f"continue from {version.ref} (its adapter trains further and is the new version's parent)"


def user_records(reg: Registry, account: str, destination: str | None = None) -> list[TrainingRecord]:
    """The account's training records (into ``destination`` when given), newest first."""
    return [r for r in Trainings(reg).list()
            if access.owner_of(r) == account and (destination is None or r.destination == destination)]


def record_trainer(reg: Registry, record: TrainingRecord) -> Version | None:
    """The version a training started from, when it is still in the registry."""
    for ref in (str((record.input or {}).get("base_model") or ""), record.model or ""):
        version = _version(reg, ref) if ref else None
        if version is not None:
            return version
    return None


def default_start(reg: Registry, account: str, destination: str, offered: set[str]) -> str | None:
    """The "start from" a form into ``destination`` opens with: the user's last choice for it, else the base
    its newest version descends from, else the first base offered."""
    for record in user_records(reg, account, destination):
        version = record_trainer(reg, record)
        if version is not None and version.ref in offered:
            return version.ref
    latest = reg.latest(destination)
    base = root_base(reg, latest) if latest is not None else None
    if base is not None and base.ref in offered:
        return base.ref
    for model in sorted({ref.rsplit(":", 1)[0] for ref in offered}):
        for v in reg.list_versions(model):
            if v.kind == "base" and v.ref in offered:
                return v.ref
    return next(iter(sorted(offered)), None)


def default_destination(reg: Registry, account: str, source_model: str, choices: list[str]) -> str:
    """The destination a form training from ``source_model`` opens with: where the user last trained from it
    to, else a new model."""
    for record in user_records(reg, account):
        trainer = record_trainer(reg, record)
        if trainer is not None and trainer.model == source_model and record.destination in choices:
            return record.destination
    return NEW_DESTINATION


def data_label(reg: Registry, value: Any) -> dict[str, Any]:
    """How a training's data file is shown: an upload by its own name and sha256 (never a server path);
    anything else by its last path component."""
    file_id = upload_id(value)
    if file_id is not None:
        try:
            stored = Files(reg).get(file_id)
        except FinetuneError:
            return {"name": f"upload {file_id[:12]}… (deleted since)", "sha256": None, "id": None}
        return {"name": stored.name, "sha256": stored.sha256, "id": stored.id}
    text = str(value or "")
    return {"name": text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "–", "sha256": None, "id": None}


def training_facts(reg: Registry, record: TrainingRecord) -> dict[str, Any]:
    """What a training page says was trained: the start point, the data file (by its own name and sha256), and
    the settings (the form's fields, then every other key that is not at its default)."""
    from .train_form import SETTINGS, changed_settings
    from .views import source_label

    config = record.input or {}
    ref = str(config.get("base_model") or record.model or "")
    version = _version(reg, ref) if ref else None
    if version is None:  # a hub id, or a folder of the server (CLI trainings): named, never by its path
        shown = source_label(ref) if ref else "–"
        start = {"kind": "other", "ref": shown, "text": shown}
    elif version.kind == "base":
        start = {"kind": "base", "ref": version.ref, "text": f"the base {version.ref} (a new adapter)"}
    else:
        start = {"kind": "version", "ref": version.ref,
                 "text": f"continued from {version.ref} (its adapter trained further)"}
    data = config.get("data") or {}
    evals = data.get("eval")
    eval_text = (f"{evals:g} of the rows held out" if isinstance(evals, (int, float)) else
                 data_label(reg, evals)["name"] if evals else "none")
    settings = []
    for key, label, _ in SETTINGS:
        section, _, name = key.partition(".")
        value = (config.get(section) or {}).get(name)
        if value is not None and key != "data.eval":
            settings.append((label, value))
    others = [(key, value) for key, value in changed_settings(config).items() if key != "data.eval"]
    return {"start": start, "data": data_label(reg, data.get("path")), "format": data.get("format") or "auto",
            "eval": eval_text, "settings": settings, "others": others}
