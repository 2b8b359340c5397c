"""The registry: destination models and their immutable, numbered versions, on the local filesystem.

:class:`Registry` is the public face of the storage below it, and stays thin: paths come from
:mod:`~finetune.registry.layout` (drawn there), models from :mod:`~finetune.registry.models`, versions, refs and
aliases from :mod:`~finetune.registry.versions`, publishing from :mod:`~finetune.registry.publish`, deletions
from :mod:`~finetune.registry.deletion` with the rules trainings add from :mod:`~finetune.registry.policy`
(the one part above the training records), listings through the index of :mod:`~finetune.registry.catalog`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, ModelNotFoundError, RegistryAccessError, UsageError
from ..names import check_alias
from . import deletion, policy, repair
from .catalog import Catalog
from .disk import ensure_writable, not_writable, staging_dir
from .gc import collect_leftovers
from .hashes import check_version_files
from .jobs import Trainings
from .layout import CHECKPOINT_STATE, JOB_KINDS, RECORD, Layout, TrainingPaths, completed_checkpoints
from .manifest import Version, check_version_dir
from .models import EDITABLE, HARDWARE, MODEL_LINKS, TEXT_LIMITS, VISIBILITIES, Model, Models, damaged_model
from .predictions import Predictions
from .publish import publish_version
from .versions import Versions

__all__ = ["CHECKPOINT_STATE", "EDITABLE", "HARDWARE", "JOB_KINDS", "MODEL_LINKS", "RECORD", "TEXT_LIMITS",
           "VISIBILITIES", "Model", "Registry", "TrainingPaths", "Version", "completed_checkpoints",
           "damaged_model", "not_writable"]


class Registry:
    """The model registry rooted at ``root`` (default: ``$FINETUNE_HOME``, else ``./registry``).

    ``index=False`` (or ``FINETUNE_INDEX=0`` in the environment) reads every file for listings, as without the
    index: it is never needed, only faster (:mod:`finetune.registry.catalog`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, index: bool | None = None):
        if root is None:
            root = os.environ.get("FINETUNE_HOME") or "registry"
        elif not str(root).strip():  # Path("") is the current folder: never what an empty --registry meant
            raise UsageError("the registry path is empty", "give --registry PATH, or set FINETUNE_HOME")
        self.root = Path(root).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise RegistryAccessError(
                f"registry root {self.root} is not a folder", "point FINETUNE_HOME at a folder, or remove the file"
            )
        self.layout = Layout(self.root)
        if index is None:
            index = os.environ.get("FINETUNE_INDEX", "1") != "0"
        self.catalog = Catalog(self.layout, enabled=index)
        self.model_store = Models(self.layout, self.catalog)
        self.version_store = Versions(self.layout, self.model_store, self.catalog)

    # ---------------------------------------------------------------- places
    def contains(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` lies inside the registry root (links resolved): a place only the registry may write."""
        target = Path(path).expanduser().absolute().resolve()
        return target == self.root.resolve() or self.root.resolve() in target.parents

    def has_models(self) -> bool:
        """Whether anything was ever created here (the models folder exists)."""
        return self.layout.models.exists()

    def jobs_dir(self, kind: str) -> Path:
        """The folder that holds one sub-folder per record of a kind of job (``trainings``, ``predictions``)."""
        return self.layout.jobs_dir(kind)

    def job_dir(self, kind: str, job_id: str) -> Path:
        """The folder of one job record; its ``record.json`` holds the record."""
        return self.layout.job_dir(kind, job_id)

    def training_paths(self, training_id: str) -> TrainingPaths:
        """The files of one training run."""
        return self.layout.training_paths(training_id)

    def accounts_dir(self) -> Path:
        """The folder of the service's accounts and token hashes (registry.accounts)."""
        return self.layout.accounts

    def files_dir(self) -> Path:
        """The folder of files uploaded to the service (registry.files)."""
        return self.layout.files

    def trackers_dir(self) -> Path:
        """The experiment trackers' stores shared by all trainings (MLflow's local database)."""
        return self.layout.trackers

    def cache_dir(self, kind: str) -> Path:
        """A folder for rebuildable derived data of one kind (e.g. ``tokenized``)."""
        return self.layout.cache_dir(kind)

    def server_files(self) -> tuple[Path, Path]:
        """The lock that the registry's one server holds while it runs, and the file naming that server."""
        return self.layout.server_files()

    def staging_dir(self, purpose: str) -> Path:
        """A new empty folder on the registry's filesystem for work in progress; `gc` removes it if abandoned."""
        return staging_dir(self.layout, purpose)

    def ensure_writable(self) -> None:
        """Raise :class:`RegistryAccessError` (naming the root and the way out) unless the registry can be written."""
        ensure_writable(self.layout)

    # ---------------------------------------------------------------- models
    def create_model(self, name: str, description: str | None = None, visibility: str | None = None,
                     hardware: str | None = None, exist_ok: bool = False, **fields: str | None) -> Model:
        """Create the destination model ``owner/name``; an existing one is an error unless ``exist_ok``.

        Settings left ``None`` take their defaults (no description, ``private``, ``auto``). With ``exist_ok``, an
        existing model is returned only if every setting given matches it (:class:`ConflictError` otherwise: a
        setting asked for is never ignored). ``fields`` may set ``readme`` and the links of :data:`MODEL_LINKS`."""
        return self.model_store.create(name, description, visibility, hardware, exist_ok, fields)

    def get_model(self, name: str) -> Model:
        """Return the model ``owner/name`` or raise :class:`ModelNotFoundError`."""
        return self.model_store.get(name)

    def damaged_models(self) -> list[IntegrityError]:
        """The errors of models whose ``model.json`` cannot be read (what :meth:`list_models` leaves out)."""
        return self.model_store.damaged()

    def list_models(self) -> list[Model]:
        """Every readable model, sorted by ``owner/name`` (a damaged ``model.json`` is left out, never hiding the
        others: :meth:`damaged_models` names those)."""
        return self.model_store.all()

    def update_model(self, name: str, **changes: str | None) -> Model:
        """Change a model's editable fields (:data:`EDITABLE`); ``None`` clears a link. Atomic under its lock."""
        return self.model_store.update(name, changes)

    def set_visibility(self, name: str, visibility: str) -> Model:
        """Make a model ``private`` or ``public``. Atomic under its lock. Versions other owners trained from it
        keep working (lineage finds parents by id); only who may see and train from it changes."""
        return self.model_store.set_visibility(name, visibility)

    def delete_model(self, name: str) -> None:
        """Delete an empty model; refused while it has versions or a training runs (or could resume) into it."""
        try:
            model = self.get_model(name)
        except ModelNotFoundError as err:
            raise ModelNotFoundError(err.message, "`finetune models list` shows the models there are") from None
        deletion.delete_model(self, model, policy.keep_model(self))

    # ---------------------------------------------------------------- versions
    def check_destination(self, model: str) -> None:
        """Raise now what publishing a training's version into ``model`` would raise at its end: the model is
        missing, its version counter is damaged, or it holds a base model (a training would make an adapter its
        latest version, under the name people load the base by)."""
        self.version_store.check_destination(model)

    def repair_counters(self, dry_run: bool = False) -> list[Path]:
        """Rebuild damaged ``model.json`` files and version counters (:mod:`finetune.registry.repair`); returns
        the files rebuilt (with ``dry_run``, that would be)."""
        return repair.repair_models(self, dry_run, lambda model: policy.numbers_in_records(self, model))

    def version(self, model: str, number: int) -> Version | None:
        """Version ``number`` of ``model``, or ``None`` if it does not exist (one ``stat``, no manifest read)."""
        return self.version_store.at(self.get_model(model), number)

    def version_numbers(self, model: str) -> list[int]:
        """The numbers of ``model``'s versions, newest first, without building :class:`Version` objects.

        For listings served again and again (the HTTP API): the answer is remembered with the versions folder's
        modification time and inode, and reused while they are unchanged. Timestamps are coarse (a clock tick),
        so a listing is remembered only once its folder has been still for a few seconds: a version published
        in the same tick as a listing is never missed."""
        return self.version_store.version_numbers(model)

    def list_versions(self, model: str, *, manifests: bool = False, limit: int | None = None) -> list[Version]:
        """All versions of ``model`` (the newest ``limit``, when given), newest first. Manifests are read lazily;
        with ``manifests``, they come read (unchanged ones from the index: a listing that shows them)."""
        if manifests:
            return self.version_store.listing(model, limit)
        return self.version_store.all(model, limit)

    def published_by(self, model: str, training_id: str) -> Version | None:
        """The version of ``model`` that training ``training_id`` published, if any (its manifest says)."""
        return self.version_store.published_by(model, training_id)

    def latest(self, model: str) -> Version | None:
        """The newest version without listing the folder: walk down from the allocation counter."""
        return self.version_store.latest(self.get_model(model))

    def resolve(self, ref: str) -> Version:
        """Resolve a reference (see :mod:`finetune.names`) to a published :class:`Version`."""
        return self.version_store.resolve(ref)

    def publish(self, model: str, src_dir: str | os.PathLike[str], parent: Version | str | dict[str, Any] | None = None,
                metadata: dict[str, Any] | None = None, kind: str | None = None, first: bool = False) -> Version:
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
        return self.version_store.aliases(model)

    def set_alias(self, ref: str, alias: str) -> Version:
        """Point ``alias`` at the version ``ref`` names (moving it if it pointed elsewhere)."""
        check_alias(alias)
        return self.version_store.set_alias(self.resolve(ref), alias)

    def remove_alias(self, model: str, alias: str, number: int | None = None) -> None:
        """Remove ``alias`` from ``model``; with ``number``, only if it points at that version (a ref naming a
        version, ``me/x:2``, must not remove an alias that has moved to ``:1``)."""
        self.version_store.remove_alias(model, alias, number)

    def children(self, version: Version) -> list[Version]:
        """Versions anywhere in the registry whose parent is ``version`` (by id; by ref when it is damaged)."""
        return deletion.children(self, version)

    def delete_version(self, ref: str, *, latest: bool = False) -> Path | None:
        """Delete a version; refused while an alias, a version of the same owner or a training needs it.

        ``ref`` must name one version explicitly (a number, an id prefix or an alias): ``owner/name`` alone, or
        ``:latest``, is refused unless ``latest`` is true, because "the newest one" changes under your feet.
        A damaged version (unreadable manifest) can be deleted: that is the way out its error message gives.
        A version only other owners' versions derive from is archived for them (its folder is returned); the
        rules: :mod:`finetune.registry.deletion` and :mod:`finetune.registry.policy`."""
        return deletion.delete_version(self, ref, latest, policy.keep_version(self))

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
            self.ensure_writable()
        removed = collect_leftovers([self.layout.staging, self.layout.trash], older_than_hours, dry_run)
        return removed + deletion.collect_archive(self, dry_run)

    def reindex(self) -> int:
        """Rebuild the index from the folders now (it is rebuilt lazily otherwise); returns its entry count."""
        for kind in ("model", "version", "trainings", "predictions"):
            self.catalog.forget(kind)
        for model in self.list_models():
            self.list_versions(model.full_name, manifests=True)
        for store in (Trainings(self), Predictions(self)):
            store.summaries()
        return self.catalog.count() or 0
