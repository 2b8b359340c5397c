"""Destination models: a named collection of versions, described by ``models/OWNER/NAME/model.json``.

:class:`Models` creates, reads, lists and edits them (``Registry`` hands its calls here); the paths come from
:class:`~finetune.registry.layout.Layout`, listings go through the index (:mod:`finetune.registry.catalog`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import (
    AlreadyExistsError,
    ConflictError,
    IntegrityError,
    ModelNotFoundError,
    RegistryAccessError,
    UsageError,
)
from ..names import check_text, parse_model_name
from .catalog import Catalog
from .disk import ensure_writable, listdir, model_lock, staging_dir
from .layout import Layout
from .manifest import FORMAT_VERSION, utc_now

VISIBILITIES = ("private", "public")
HARDWARE = ("cpu", "gpu", "auto")
# Optional text fields of a model besides its description (Replicate's model object has the same names).
MODEL_LINKS = ("github_url", "paper_url", "license_url", "cover_image_url")
EDITABLE = ("description", "readme", *MODEL_LINKS)
# The longest text each field takes (characters): every listing sends them, so none may be unbounded.
TEXT_LIMITS = {"description": 2000, "readme": 64 * 1024, **dict.fromkeys(MODEL_LINKS, 2048)}


class Model:
    """A destination model: a named collection of versions."""

    def __init__(self, path: Path, info: dict[str, Any]):
        self.path = path
        self.owner: str = info["owner"]
        self.name: str = info["name"]
        self.description: str = info.get("description", "")
        self.visibility: str = info.get("visibility", "private")
        self.hardware: str = info.get("hardware", "auto")
        self.created_at: str = info.get("created_at", "")
        self.readme: str = info.get("readme", "")
        self.links: dict[str, str | None] = {key: info.get(key) for key in MODEL_LINKS}

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "name": self.name,
            "description": self.description,
            "visibility": self.visibility,
            "hardware": self.hardware,
            "created_at": self.created_at,
            "readme": self.readme,
            **self.links,
        }

    def __repr__(self) -> str:
        return f"Model({self.full_name!r})"


class Models:
    """The models of one registry, on disk."""

    def __init__(self, layout: Layout, catalog: Catalog):
        self.layout = layout
        self.catalog = catalog

    def dir(self, name: str) -> Path:
        return self.layout.model_dir(*parse_model_name(name))

    def create(self, name: str, description: str | None, visibility: str | None, hardware: str | None,
               exist_ok: bool, fields: dict[str, str | None]) -> Model:
        """See :meth:`Registry.create_model`."""
        check_fields({**fields, "description": description}, allowed=EDITABLE)
        owner, short = parse_model_name(name)
        if visibility is not None and visibility not in VISIBILITIES:
            raise UsageError(f"invalid visibility {visibility!r}", f"use one of: {', '.join(VISIBILITIES)}")
        if hardware is not None and hardware not in HARDWARE:
            raise UsageError(f"invalid hardware {hardware!r}", f"use one of: {', '.join(HARDWARE)}")
        given = {"description": description, "visibility": visibility, "hardware": hardware, **fields}
        asked = {k: v for k, v in given.items() if v is not None}
        model_dir = self.layout.model_dir(owner, short)
        try:
            exists = model_dir.exists()
        except OSError as err:  # EACCES: Path.exists only swallows "not found"-like errors
            raise RegistryAccessError(
                f"cannot read registry root {self.layout.root}: {err.strerror}", "check FINETUNE_HOME and permissions"
            ) from None
        if exists:
            if exist_ok:
                return same_settings(self.get(name), asked)
            raise AlreadyExistsError(f"model {name} already exists", "pass --exist-ok to reuse it")
        ensure_writable(self.layout)
        info = {"format": FORMAT_VERSION, "owner": owner, "name": short, "description": "", "visibility": "private",
                "hardware": "auto", "created_at": utc_now(), **asked}
        stage = staging_dir(self.layout, "model")
        atomic.write_bytes_durable(self.layout.model_file(stage), atomic.pretty_json(info))
        self.layout.versions_dir(stage).mkdir()
        atomic.fsync_dir(stage)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic.rename_noreplace(stage, model_dir)
        except FileExistsError:
            atomic.remove_tree(stage)
            if exist_ok:
                return same_settings(self.get(name), asked)
            raise AlreadyExistsError(f"model {name} already exists", "pass --exist-ok to reuse it") from None
        atomic.fsync_dir(model_dir.parent)
        return Model(model_dir, info)

    def get(self, name: str) -> Model:
        """See :meth:`Registry.get_model`."""
        model_dir = self.dir(name)
        try:
            raw = self.layout.model_file(model_dir).read_bytes()
        except FileNotFoundError:
            raise ModelNotFoundError(
                f"model {name} not found in {self.layout.root}", f"create it with `finetune models create {name}`"
            ) from None
        except NotADirectoryError:
            raise RegistryAccessError(
                f"cannot read registry root {self.layout.root}: a part of that path is a file",
                "point FINETUNE_HOME at a folder",
            ) from None
        except OSError as err:
            raise RegistryAccessError(
                f"cannot read {model_dir}: {err.strerror}", "check FINETUNE_HOME and permissions"
            ) from None
        return self._parse(model_dir, raw)

    def _parse(self, model_dir: Path, raw: bytes | str) -> Model:
        path = self.layout.model_file(model_dir)
        try:
            info = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise damaged_model(path, f"not valid JSON ({type(err).__name__})") from None
        owner, short = model_dir.parent.name, model_dir.name
        if not isinstance(info, dict):
            raise damaged_model(path, f"a JSON {type(info).__name__}, not an object")
        for key, want in (("owner", owner), ("name", short)):
            if info.get(key) != want:
                raise damaged_model(path, f"its {key!r} is {json.dumps(info.get(key))}, not {want!r}")
        for key in ("description", "visibility", "hardware", "created_at", "readme", *MODEL_LINKS):
            if info.get(key) is not None and not isinstance(info[key], str):
                raise damaged_model(path, f"its {key!r} is not text")
        return Model(model_dir, info)

    def names(self) -> list[str]:
        """Every ``owner/name`` with a ``model.json``, sorted."""
        out = []
        for owner in sorted(listdir(self.layout.models), key=lambda e: e.name):
            if not owner.is_dir():
                continue
            for entry in sorted(listdir(Path(owner.path)), key=lambda e: e.name):
                if self.layout.model_file(Path(entry.path)).is_file():
                    out.append(f"{owner.name}/{entry.name}")
        return out

    def all(self) -> list[Model]:
        """See :meth:`Registry.list_models`: unchanged ``model.json`` files come from the index."""
        names = self.names()
        texts = self.catalog.cached("model", "", names, lambda name: str(self.layout.model_file(self.dir(name))),
                                    _load_model_json)
        out = []
        for name in names:
            try:
                text = texts.get(name)
                out.append(self._parse(self.dir(name), text) if text is not None else self.get(name))
            except (IntegrityError, ModelNotFoundError):  # damaged, or deleted since it was listed
                continue
        return out

    def damaged(self) -> list[IntegrityError]:
        out = []
        for name in self.names():
            try:
                self.get(name)
            except IntegrityError as err:
                out.append(err)
        return out

    def update(self, name: str, changes: dict[str, str | None]) -> Model:
        """See :meth:`Registry.update_model`."""
        check_fields(changes, allowed=EDITABLE)
        model = self.get(name)

        def change(info: dict[str, Any]) -> None:
            for key, value in changes.items():
                if value is None and key in MODEL_LINKS:
                    info.pop(key, None)
                else:
                    info[key] = value or ""
        return self._rewrite(model, change)

    def set_visibility(self, name: str, visibility: str) -> Model:
        """See :meth:`Registry.set_visibility`."""
        if visibility not in VISIBILITIES:
            raise UsageError(f"invalid visibility {visibility!r}", f"use one of: {', '.join(VISIBILITIES)}")
        return self._rewrite(self.get(name), lambda info: info.update(visibility=visibility))

    def _rewrite(self, model: Model, change: Any) -> Model:
        ensure_writable(self.layout)
        path = self.layout.model_file(model.path)
        with model_lock(self.layout, model.path):
            info = json.loads(path.read_bytes())
            change(info)
            atomic.replace_file(path, atomic.pretty_json(info), self.layout.staging)
        return Model(model.path, info)


def _load_model_json(key: str, path: str) -> str | None:
    try:
        text = Path(path).read_text(encoding="utf-8")
        json.loads(text)
    except (OSError, ValueError):
        return None  # the caller reads it again for the error
    return text


def damaged_model(path: Path, why: str) -> IntegrityError:
    """The error for a ``model.json`` (at ``path``) that cannot be used, and the way out."""
    return IntegrityError(f"{path} is damaged: {why}",
                          "restore it, or run `finetune registry gc` to rebuild it (as a private model with no "
                          "description; the damaged file is kept beside it as model.json.damaged)")


def same_settings(model: Model, asked: dict[str, str]) -> Model:
    """``model``, when it has every setting in ``asked``; otherwise :class:`ConflictError` naming the differences."""
    have = model.to_dict()
    differ = [f"{key} is {_shown(have.get(key))}, not {_shown(value)}" for key, value in asked.items()
              if (have.get(key) or "") != value]
    if differ:
        raise ConflictError(f"model {model.full_name} exists with other settings: {'; '.join(differ)}",
                            "leave those options out to use it as it is, or create a model of another name")
    return model


def _shown(value: object) -> str:
    text = json.dumps(value if value is not None else "", ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + '..."'


def check_fields(fields: dict[str, Any], allowed: tuple[str, ...] = ("readme", *MODEL_LINKS)) -> None:
    """Refuse unknown model fields, non-text values and text over its limit (:data:`TEXT_LIMITS`)."""
    for key, value in fields.items():
        if key not in allowed:
            raise UsageError(f"unknown model field {key!r}", f"use one of: {', '.join(allowed)}")
        if value is not None and not isinstance(value, str):
            raise UsageError(f"model field {key!r} must be text, not {type(value).__name__}")
        if value is not None:
            check_text(value, key)
            limit = TEXT_LIMITS.get(key, 2048)
            if len(value) > limit:
                raise UsageError(f"the {key} is {len(value):,} characters long; the most is {limit:,}",
                                 "put the rest in the model's readme" if key == "description" else "shorten it")
