"""The registry: destination models and their immutable, numbered versions, on the local filesystem.

This module owns the on-disk layout, drawn here once; no other module builds a path inside the registry root
(they ask :class:`Registry` for the folder or the :class:`TrainingPaths` they need)::

    ROOT/
      models/OWNER/NAME/
        model.json             description, visibility, hardware, created_at, readme and links
        next_version           the next number to hand out (numbers are never reused)
        aliases.json           {"prod": 3, ...}
        .lock                  allocation lock (filelock)
        versions/N/            one published version: its files + manifest.json, all read-only
        retired/N              the tombstone of deleted version N (registry.deletion)
      trainings/ID/            one training run (registry.jobs.Trainings); ID = YYYYMMDD-HHMMSS-xxxxxx
        record.json            id, status, model, destination, input, output, metrics, error, timestamps, pid
        train.log              what the run printed
        metrics.jsonl          one JSON object per logged step
        checkpoints/step-N/    what --resume needs (training.checkpoint)
        output/                the adapter folder that gets published
        trackers/              what experiment trackers wrote (tensorboard/ event files, wandb/ offline runs)
        cancel                 present when `finetune trainings cancel` asked the run to stop
      predictions/ID/          prediction records, same store (registry.jobs.RecordStore)
      accounts/                the service's accounts and token hashes (registry.accounts)
      files/                   files uploaded to the service (registry.files)
      archive/ID/              a version its owner deleted that other owners' versions derive from (registry.deletion)
      cache/KIND/...           derived data that can be rebuilt (tokenized datasets, verified hashes)
      trackers/                experiment trackers' stores shared by all trainings (mlflow.db, MLflow's local store)
      .staging/                publishes and temp files in progress; `gc` removes abandoned ones
      .trash/                  deletions in progress
      server.lock, server.json the lock the one server of this registry holds, and who it is (server.instance)

A version folder appears whole or not at all (publishing stages and commits it: :mod:`finetune.registry.publish`);
``.staging`` and ``.trash`` entries are named after their process so `gc` can tell abandoned ones
(:mod:`finetune.registry.gc`). Job records (``record.json``) are replaced
atomically on every change, so a reader never sees half a record.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from .. import atomic
from ..errors import (
    AlreadyExistsError,
    AmbiguousRefError,
    ConflictError,
    IntegrityError,
    ModelNotFoundError,
    NotFoundError,
    RegistryAccessError,
    UsageError,
    VersionNotFoundError,
)
from ..names import check_alias, check_name, check_text, parse_model_name, parse_ref
from . import deletion, repair
from .aliases import read_aliases
from .gc import collect_leftovers, work_name
from .hashes import check_version_files
from .manifest import FORMAT_VERSION, Version, check_version_dir, utc_now
from .publish import publish_version

VISIBILITIES = ("private", "public")
HARDWARE = ("cpu", "gpu", "auto")
RECORD = "record.json"  # a job record's file in its folder
CHECKPOINT_STATE = "state.json"  # a training checkpoint's last file: its presence means the checkpoint is complete
JOB_KINDS = ("trainings", "predictions")  # the folders of job records under the root (see the layout above)
# Optional text fields of a model besides its description (Replicate's model object has the same names).
MODEL_LINKS = ("github_url", "paper_url", "license_url", "cover_image_url")
EDITABLE = ("description", "readme", *MODEL_LINKS)
# The longest text each field takes (characters): every listing sends them, so none may be unbounded.
TEXT_LIMITS = {"description": 2000, "readme": 64 * 1024, **dict.fromkeys(MODEL_LINKS, 2048)}
LOCK_TIMEOUT_S = 120
_STILL_NS = 3_000_000_000  # a versions folder unchanged this long may have its listing remembered
_LATEST_WALK = 256  # numbers `latest` probes one by one before it lists the versions folder instead


@dataclass(frozen=True)
class TrainingPaths:
    """Where one training run keeps its files (see the layout above); handed out by :meth:`Registry.training_paths`."""

    folder: Path
    record: Path
    log: Path
    metrics: Path
    checkpoints: Path
    output: Path
    cancel: Path  # the marker `finetune trainings cancel` leaves

    @property
    def trackers(self) -> Path:
        """Where experiment trackers write this run's files (training.trackers)."""
        return self.folder / "trackers"

    @classmethod
    def under(cls, folder: Path) -> TrainingPaths:
        return cls(folder, folder / RECORD, folder / "train.log", folder / "metrics.jsonl",
                   folder / "checkpoints", folder / "output", folder / "cancel")


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


class Registry:
    """The model registry rooted at ``root`` (default: ``$FINETUNE_HOME``, else ``./registry``)."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        if root is None:
            root = os.environ.get("FINETUNE_HOME") or "registry"
        elif not str(root).strip():  # Path("") is the current folder: never what an empty --registry meant
            raise UsageError("the registry path is empty", "give --registry PATH, or set FINETUNE_HOME")
        self.root = Path(root).expanduser().absolute()
        self._numbers_cache: dict[Path, tuple[tuple[int, int], tuple[int, ...]]] = {}  # see version_numbers
        if self.root.exists() and not self.root.is_dir():
            raise RegistryAccessError(
                f"registry root {self.root} is not a folder", "point FINETUNE_HOME at a folder, or remove the file"
            )

    # ---------------------------------------------------------------- layout
    def _model_dir(self, owner: str, name: str) -> Path:
        return self.root / "models" / check_name(owner, "owner") / check_name(name, "model name")

    def _versions_dir(self, model_dir: Path) -> Path:
        return model_dir / "versions"

    @property
    def _staging(self) -> Path:
        return self.root / ".staging"

    @property
    def _trash(self) -> Path:
        return self.root / ".trash"

    def contains(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` lies inside the registry root (links resolved): a place only the registry may write."""
        target = Path(path).expanduser().absolute().resolve()
        return target == self.root.resolve() or self.root.resolve() in target.parents

    def has_models(self) -> bool:
        """Whether anything was ever created here (the models folder exists)."""
        return (self.root / "models").exists()

    def jobs_dir(self, kind: str) -> Path:
        """The folder that holds one sub-folder per record of a kind of job (``trainings``, ``predictions``)."""
        if kind not in JOB_KINDS:
            raise UsageError(f"unknown kind of job {kind!r}", f"use one of: {', '.join(JOB_KINDS)}")
        return self.root / kind

    def job_dir(self, kind: str, job_id: str) -> Path:
        """The folder of one job record; its ``record.json`` holds the record."""
        return self.jobs_dir(kind) / check_name(job_id, f"{kind.removesuffix('s')} id")

    def training_paths(self, training_id: str) -> TrainingPaths:
        """The files of one training run."""
        return TrainingPaths.under(self.job_dir("trainings", training_id))

    def accounts_dir(self) -> Path:
        """The folder of the service's accounts and token hashes (registry.accounts)."""
        return self.root / "accounts"

    def files_dir(self) -> Path:
        """The folder of files uploaded to the service (registry.files)."""
        return self.root / "files"

    def trackers_dir(self) -> Path:
        """The experiment trackers' stores shared by all trainings (MLflow's local database)."""
        return self.root / "trackers"

    def cache_dir(self, kind: str) -> Path:
        """A folder for rebuildable derived data of one kind (e.g. ``tokenized``)."""
        return self.root / "cache" / check_name(kind, "cache kind")

    def server_files(self) -> tuple[Path, Path]:
        """The lock that the registry's one server holds while it runs, and the file naming that server."""
        return self.root / "server.lock", self.root / "server.json"

    def staging_dir(self, purpose: str) -> Path:
        """A new empty folder on the registry's filesystem for work in progress; `gc` removes it if abandoned."""
        self._ensure_writable()
        path = self._staging / work_name(purpose)
        try:
            path.mkdir(parents=True)
        except OSError as err:
            raise RegistryAccessError(
                f"cannot write to registry root {self.root}: {err.strerror}", "check FINETUNE_HOME and permissions"
            ) from None
        return path

    def _ensure_writable(self) -> None:
        """Refuse, in one clear line, to start a write the registry's filesystem would refuse half-way.

        Creating folders that exist succeeds even on a read-only mount, so a probe file is created and removed."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for sub in ("models", ".staging", ".trash"):
                (self.root / sub).mkdir(exist_ok=True)
            probe = self._staging / work_name("probe")  # named by its process, so `gc` leaves it alone
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            probe.unlink(missing_ok=True)
        except OSError as err:
            raise not_writable(self.root, err) from None

    def ensure_writable(self) -> None:
        """Raise :class:`RegistryAccessError` (naming the root and the way out) unless the registry can be written."""
        self._ensure_writable()

    def _lock(self, model_dir: Path) -> FileLock:
        return FileLock(str(model_dir / ".lock"), timeout=LOCK_TIMEOUT_S)

    def _listdir(self, path: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(path) as it:
                return list(it)
        except FileNotFoundError:
            return []
        except (PermissionError, NotADirectoryError) as err:
            raise RegistryAccessError(
                f"cannot read {path}: {err.strerror}", "check FINETUNE_HOME and permissions"
            ) from None

    # ---------------------------------------------------------------- models
    def create_model(
        self,
        name: str,
        description: str | None = None,
        visibility: str | None = None,
        hardware: str | None = None,
        exist_ok: bool = False,
        **fields: str | None,
    ) -> Model:
        """Create the destination model ``owner/name``; an existing one is an error unless ``exist_ok``.

        Settings left ``None`` take their defaults (no description, ``private``, ``auto``). With ``exist_ok``, an
        existing model is returned only if every setting given matches it (:class:`ConflictError` otherwise: a
        setting asked for is never ignored). ``fields`` may set ``readme`` and the links of :data:`MODEL_LINKS`."""
        _check_fields({**fields, "description": description}, allowed=EDITABLE)
        owner, short = parse_model_name(name)
        if visibility is not None and visibility not in VISIBILITIES:
            raise UsageError(f"invalid visibility {visibility!r}", f"use one of: {', '.join(VISIBILITIES)}")
        if hardware is not None and hardware not in HARDWARE:
            raise UsageError(f"invalid hardware {hardware!r}", f"use one of: {', '.join(HARDWARE)}")
        given = {"description": description, "visibility": visibility, "hardware": hardware, **fields}
        asked = {k: v for k, v in given.items() if v is not None}
        model_dir = self._model_dir(owner, short)
        try:
            exists = model_dir.exists()
        except OSError as err:  # EACCES: Path.exists only swallows "not found"-like errors
            raise RegistryAccessError(
                f"cannot read registry root {self.root}: {err.strerror}", "check FINETUNE_HOME and permissions"
            ) from None
        if exists:
            if exist_ok:
                return _same_settings(self.get_model(name), asked)
            raise AlreadyExistsError(f"model {name} already exists", "pass --exist-ok to reuse it")
        self._ensure_writable()
        info = {
            "format": FORMAT_VERSION,
            "owner": owner,
            "name": short,
            "description": "",
            "visibility": "private",
            "hardware": "auto",
            "created_at": utc_now(),
            **asked,
        }
        stage = self.staging_dir("model")
        atomic.write_bytes_durable(stage / "model.json", atomic.pretty_json(info))
        (stage / "versions").mkdir()
        atomic.fsync_dir(stage)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            atomic.rename_noreplace(stage, model_dir)
        except FileExistsError:
            atomic.remove_tree(stage)
            if exist_ok:
                return _same_settings(self.get_model(name), asked)
            raise AlreadyExistsError(f"model {name} already exists", "pass --exist-ok to reuse it") from None
        atomic.fsync_dir(model_dir.parent)
        return Model(model_dir, info)

    def get_model(self, name: str) -> Model:
        """Return the model ``owner/name`` or raise :class:`ModelNotFoundError`."""
        owner, short = parse_model_name(name)
        model_dir = self._model_dir(owner, short)
        try:
            info = json.loads((model_dir / "model.json").read_bytes())
        except FileNotFoundError:
            raise ModelNotFoundError(
                f"model {name} not found in {self.root}", f"create it with `finetune models create {name}`"
            ) from None
        except NotADirectoryError:
            raise RegistryAccessError(
                f"cannot read registry root {self.root}: a part of that path is a file",
                "point FINETUNE_HOME at a folder",
            ) from None
        except OSError as err:
            raise RegistryAccessError(
                f"cannot read {model_dir}: {err.strerror}", "check FINETUNE_HOME and permissions"
            ) from None
        except (ValueError, UnicodeDecodeError) as err:
            raise damaged_model(model_dir, f"not valid JSON ({type(err).__name__})") from None
        owner, short = model_dir.parent.name, model_dir.name
        if not isinstance(info, dict):
            raise damaged_model(model_dir, f"a JSON {type(info).__name__}, not an object")
        for key, want in (("owner", owner), ("name", short)):
            if info.get(key) != want:
                raise damaged_model(model_dir, f"its {key!r} is {json.dumps(info.get(key))}, not {want!r}")
        for key in ("description", "visibility", "hardware", "created_at", "readme", *MODEL_LINKS):
            if info.get(key) is not None and not isinstance(info[key], str):
                raise damaged_model(model_dir, f"its {key!r} is not text")
        return Model(model_dir, info)

    def damaged_models(self) -> list[IntegrityError]:
        """The errors of models whose ``model.json`` cannot be read (what :meth:`list_models` leaves out)."""
        out = []
        for name in self._model_names():
            try:
                self.get_model(name)
            except IntegrityError as err:
                out.append(err)
        return out

    def _model_names(self) -> list[str]:
        out = []
        for owner in sorted(self._listdir(self.root / "models"), key=lambda e: e.name):
            if not owner.is_dir():
                continue
            for entry in sorted(self._listdir(Path(owner.path)), key=lambda e: e.name):
                if (Path(entry.path) / "model.json").is_file():
                    out.append(f"{owner.name}/{entry.name}")
        return out

    def list_models(self) -> list[Model]:
        """Every readable model, sorted by ``owner/name`` (a damaged ``model.json`` is left out, never hiding the
        others: :meth:`damaged_models` names those)."""
        out = []
        for name in self._model_names():
            try:
                out.append(self.get_model(name))
            except (IntegrityError, ModelNotFoundError):  # damaged, or deleted since it was listed
                continue
        return out

    def update_model(self, name: str, **changes: str | None) -> Model:
        """Change a model's editable fields (:data:`EDITABLE`); ``None`` clears a link. Atomic under its lock."""
        _check_fields(changes, allowed=EDITABLE)
        model = self.get_model(name)
        self._ensure_writable()
        with self._lock(model.path):
            info = json.loads((model.path / "model.json").read_bytes())
            for key, value in changes.items():
                if value is None and key in MODEL_LINKS:
                    info.pop(key, None)
                else:
                    info[key] = value or ""
            atomic.replace_file(model.path / "model.json", atomic.pretty_json(info), self._staging)
        return Model(model.path, info)

    def set_visibility(self, name: str, visibility: str) -> Model:
        """Make a model ``private`` or ``public``. Atomic under its lock. Versions other owners trained from it
        keep working (lineage finds parents by id); only who may see and train from it changes."""
        if visibility not in VISIBILITIES:
            raise UsageError(f"invalid visibility {visibility!r}", f"use one of: {', '.join(VISIBILITIES)}")
        model = self.get_model(name)
        self._ensure_writable()
        with self._lock(model.path):
            info = json.loads((model.path / "model.json").read_bytes())
            info["visibility"] = visibility
            atomic.replace_file(model.path / "model.json", atomic.pretty_json(info), self._staging)
        return Model(model.path, info)

    def delete_model(self, name: str) -> None:
        """Delete an empty model; refused while it has versions or a training runs (or could resume) into it."""
        try:
            model = self.get_model(name)
        except ModelNotFoundError as err:
            raise ModelNotFoundError(err.message, "`finetune models list` shows the models there are") from None
        deletion.delete_model(self, model)

    # ---------------------------------------------------------------- versions
    def _version_numbers(self, model_dir: Path) -> list[int]:
        return [
            int(e.name) for e in self._listdir(self._versions_dir(model_dir)) if e.name.isdigit() and e.is_dir()
        ]

    def _next_number(self, model_dir: Path) -> int:
        try:
            return int((model_dir / "next_version").read_text().strip())
        except FileNotFoundError:
            return 1
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError(f"{model_dir / 'next_version'} is damaged",
                                 "run `finetune registry gc` (it rebuilds the counter from the versions)") from None

    def check_destination(self, model: str) -> None:
        """Raise now what publishing a training's version into ``model`` would raise at its end: the model is
        missing, its version counter is damaged, or it holds a base model (a training would make an adapter its
        latest version, under the name people load the base by)."""
        m = self.get_model(model)
        self._next_number(m.path)
        latest = self._latest(m)
        try:
            kind = latest.kind if latest is not None else None
        except IntegrityError:
            kind = None  # a damaged newest version says nothing about the model; listing shows it
        if kind == "base" and latest is not None:
            raise ConflictError(f"{model} holds base model {latest.ref}: a training would make an adapter its latest",
                                f"train into a model of its own, e.g. --destination {model}-ft --create-destination")

    def repair_counters(self, dry_run: bool = False) -> list[Path]:
        """Rebuild damaged ``model.json`` files and version counters (:mod:`finetune.registry.repair`); returns
        the files rebuilt (with ``dry_run``, that would be)."""
        return repair.repair_models(self, dry_run)

    def _version(self, model: Model, number: int) -> Version | None:
        path = self._versions_dir(model.path) / str(number)
        return Version(model.full_name, number, path) if path.is_dir() else None

    def version(self, model: str, number: int) -> Version | None:
        """Version ``number`` of ``model``, or ``None`` if it does not exist (one ``stat``, no manifest read)."""
        return self._version(self.get_model(model), number)

    def version_numbers(self, model: str) -> list[int]:
        """The numbers of ``model``'s versions, newest first, without building :class:`Version` objects.

        For listings served again and again (the HTTP API): the answer is remembered with the versions folder's
        modification time and inode, and reused while they are unchanged. Timestamps are coarse (a clock tick),
        so a listing is remembered only once its folder has been still for a few seconds: a version published
        in the same tick as a listing is never missed."""
        vdir = self._versions_dir(self.get_model(model).path)
        try:
            st = os.stat(vdir)
        except FileNotFoundError:
            return []
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._numbers_cache.get(vdir)
        if cached is not None and cached[0] == stamp:
            return list(cached[1])
        numbers = sorted(self._version_numbers(vdir.parent), reverse=True)
        if time.time_ns() - st.st_mtime_ns > _STILL_NS:
            self._numbers_cache[vdir] = (stamp, tuple(numbers))
        return numbers

    def list_versions(self, model: str) -> list[Version]:
        """All versions of ``model``, newest first. Manifests are read lazily."""
        m = self.get_model(model)
        vdir = self._versions_dir(m.path)
        return [Version(m.full_name, n, vdir / str(n)) for n in sorted(self._version_numbers(m.path), reverse=True)]

    def published_by(self, model: str, training_id: str) -> Version | None:
        """The version of ``model`` that training ``training_id`` published, if any (its manifest says)."""
        try:
            versions = self.list_versions(model)
        except ModelNotFoundError:
            return None
        return next((v for v in versions if v.metadata.get("training_id") == training_id), None)

    def latest(self, model: str) -> Version | None:
        """The newest version without listing the folder: walk down from the allocation counter."""
        return self._latest(self.get_model(model))

    def _latest(self, m: Model) -> Version | None:
        if not (m.path / "next_version").exists():
            # No counter: a model never published to (an empty listing), or version folders copied in by hand.
            numbers = self._version_numbers(m.path)
            return self._version(m, max(numbers)) if numbers else None
        number = self._next_number(m.path) - 1
        # Numbers between the newest version and the counter belong to publishes in progress or crashed;
        # a deleted newest version makes us walk further. Both are rare and short; a long walk (many newest
        # versions deleted, a damaged counter) falls back to one listing rather than a stat per number.
        for _ in range(_LATEST_WALK):
            if number < 1:
                return None
            v = self._version(m, number)
            if v is not None:
                return v
            number -= 1
        below = [n for n in self._version_numbers(m.path) if n <= number]
        return self._version(m, max(below)) if below else None

    def resolve(self, ref: str) -> Version:
        """Resolve a reference (see :mod:`finetune.names`) to a published :class:`Version`."""
        r = parse_ref(ref)
        model = self.get_model(r.model)
        if r.kind == "latest":
            v = self._latest(model)
            if v is None:
                raise VersionNotFoundError(
                    f"model {r.model} has no versions yet", "train into it or `finetune models import` a base"
                )
            return v
        if r.kind == "number":
            v = self._version(model, int(r.value))  # type: ignore[arg-type]  # an int for kind "number"
            if v is None:
                raise VersionNotFoundError(
                    f"version {r.model}:{r.value} not found", f"see `finetune versions list {r.model}`"
                )
            return v
        if r.kind == "alias":
            aliases = self.aliases(r.model)
            if r.value not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise VersionNotFoundError(f"no alias {r.value!r} on {r.model} (aliases: {known})")
            v = self._version(model, aliases[r.value])
            if v is None:
                raise VersionNotFoundError(f"alias {r.model}:{r.value} points at a deleted version")
            return v
        matches = [v for v in self.list_versions(r.model) if v.id.startswith(str(r.value))]
        if not matches:
            raise VersionNotFoundError(f"no version of {r.model} has an id starting with {r.value}")
        if len(matches) > 1:
            listed = ", ".join(f"{v.ref} ({v.id[:16]})" for v in matches)
            raise AmbiguousRefError(f"id prefix {r.value} is ambiguous: {listed}", "give more hex characters")
        return matches[0]

    def publish(
        self,
        model: str,
        src_dir: str | os.PathLike[str],
        parent: Version | str | dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        kind: str | None = None,
        first: bool = False,
    ) -> Version:
        """Publish the files of ``src_dir`` as the next version of ``model``; atomic and safe across processes.

        ``parent`` is the version this one derives from (a :class:`Version` or a ref, stored as exact ref and
        id), or a dict describing an outside origin (``{"hub_id": ..., "revision": ...}``). ``kind`` defaults
        to ``adapter`` when ``src_dir`` holds ``adapter_config.json``, ``base`` when it holds ``config.json``.
        With ``first``, the version must be the model's first (checked under the model's lock: imports of a base).
        How: :mod:`finetune.registry.publish`.
        """
        return publish_version(self, model, Path(src_dir), parent, metadata, kind, first=first)

    # ---------------------------------------------------------------- aliases, deletion
    def aliases(self, model: str) -> dict[str, int]:
        """The model's aliases, ``{alias: version number}`` (a malformed ``aliases.json`` is an
        :class:`IntegrityError` saying how to fix it: :mod:`finetune.registry.aliases`)."""
        return read_aliases(self.get_model(model).path)

    def set_alias(self, ref: str, alias: str) -> Version:
        """Point ``alias`` at the version ``ref`` names (moving it if it pointed elsewhere)."""
        check_alias(alias)
        version = self.resolve(ref)
        m = self.get_model(version.model)
        self._ensure_writable()
        with self._lock(m.path):
            # delete_version checks aliases under this lock, so check here, under it too, that the version was not
            # deleted since resolve(): otherwise the alias could end up pointing at nothing.
            if not version.path.is_dir():
                raise VersionNotFoundError(f"version {version.ref} not found (deleted just now)")
            aliases = self.aliases(version.model)
            aliases[alias] = version.number
            atomic.replace_file(m.path / "aliases.json", atomic.pretty_json(aliases), self._staging)
        return version

    def remove_alias(self, model: str, alias: str, number: int | None = None) -> None:
        """Remove ``alias`` from ``model``; with ``number``, only if it points at that version (a ref naming a
        version, ``me/x:2``, must not remove an alias that has moved to ``:1``)."""
        m = self.get_model(model)
        self._ensure_writable()
        with self._lock(m.path):
            aliases = self.aliases(model)
            if alias not in aliases:
                raise NotFoundError(f"no alias {alias!r} on {model}")
            if number is not None and aliases[alias] != number:
                raise ConflictError(f"alias {alias!r} points at {model}:{aliases[alias]}, not {model}:{number}",
                                    f"to remove it anyway, name the model alone: `finetune versions alias {model} "
                                    f"{alias} --remove`")
            del aliases[alias]
            atomic.replace_file(m.path / "aliases.json", atomic.pretty_json(aliases), self._staging)

    def children(self, version: Version) -> list[Version]:
        """Versions anywhere in the registry whose parent is ``version`` (by id; by ref when it is damaged)."""
        return deletion.children(self, version)

    def delete_version(self, ref: str, *, latest: bool = False) -> Path | None:
        """Delete a version; refused while an alias, a version of the same owner or a training needs it.

        ``ref`` must name one version explicitly (a number, an id prefix or an alias): ``owner/name`` alone, or
        ``:latest``, is refused unless ``latest`` is true, because "the newest one" changes under your feet.
        A damaged version (unreadable manifest) can be deleted: that is the way out its error message gives.
        A version only other owners' versions derive from is archived for them (its folder is returned); the
        rules: :mod:`finetune.registry.deletion`."""
        return deletion.delete_version(self, ref, latest)

    # ---------------------------------------------------------------- integrity
    def verify(self, ref: str | Version) -> list[str]:
        """Re-hash every file of a version; return one line per problem (empty when intact)."""
        version = ref if isinstance(ref, Version) else self.resolve(ref)
        return check_version_dir(version.path, full=True)

    def check(self, version: Version) -> None:
        """The check done before any of a version's files are read: the manifest's hash, and every file's size
        and sha256 (a file unchanged since it last matched is not read again: :mod:`finetune.registry.hashes`).
        Raises :class:`IntegrityError`."""
        problems = check_version_files(self, version)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise IntegrityError(
                f"{version.ref} is damaged: {problems[0]}{more}",
                f"run `finetune versions verify {version.ref}`",
            )

    # ---------------------------------------------------------------- housekeeping
    def gc(self, older_than_hours: float = 24.0, dry_run: bool = False) -> list[Path]:
        """Remove leftovers of interrupted publishes and deletions older than ``older_than_hours``.

        A staging folder whose creating process is still alive on this host is kept whatever its age. Archived
        versions nothing derives from any more go too (:mod:`finetune.registry.deletion`).
        """
        # NaN compares false with everything: "older than nan hours" would remove another host's work at once.
        if isinstance(older_than_hours, bool) or not isinstance(older_than_hours, (int, float)) \
                or math.isnan(older_than_hours) or older_than_hours < 0:
            raise UsageError(f"--older-than must be a number of hours, 0 or more, not {older_than_hours!r}",
                             "e.g. --older-than 24: what another host may still be writing is younger than that")
        if not dry_run:
            self._ensure_writable()
        removed = collect_leftovers(self, [self._staging, self._trash], older_than_hours, dry_run)
        return removed + deletion.collect_archive(self, dry_run)


def damaged_model(model_dir: Path, why: str) -> IntegrityError:
    """The error for a ``model.json`` that cannot be used, and the way out."""
    path = model_dir / "model.json"
    return IntegrityError(f"{path} is damaged: {why}",
                          "restore it, or run `finetune registry gc` to rebuild it (as a private model with no "
                          "description; the damaged file is kept beside it as model.json.damaged)")


def completed_checkpoints(root: Path) -> list[Path]:
    """A training's checkpoints that were completed (``state.json`` written last), newest first
    (:mod:`finetune.training.checkpoint` writes them; the registry needs to know which runs can still resume)."""
    return [p for p in sorted(root.glob("step-*"), reverse=True) if (p / CHECKPOINT_STATE).is_file()]


def not_writable(root: Path, err: OSError) -> RegistryAccessError:
    """The one error for a registry that cannot be written (read-only mount, permissions, full disk)."""
    why = err.strerror or type(err).__name__
    if err.errno == errno.ENOSPC:
        return RegistryAccessError(f"the registry at {root} is out of space ({why})",
                                   "free space on its disk, or point FINETUNE_HOME (or --registry) at another disk")
    return RegistryAccessError(f"the registry at {root} is not writable ({why})",
                               "point FINETUNE_HOME (or --registry) at a writable folder, or make this one writable")


def _same_settings(model: Model, asked: dict[str, str]) -> Model:
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


def _check_fields(fields: dict[str, Any], allowed: tuple[str, ...] = ("readme", *MODEL_LINKS)) -> None:
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

