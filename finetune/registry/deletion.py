"""Deleting versions and models: what still needs them, the tombstones that keep numbers unique, and the archive
that keeps other accounts' versions working.

A version is not deleted while

* an alias points at it, or a version of the same owner names it as its parent (delete that one first);
* a training runs from it, or an interrupted training of the same owner could still resume from it (it has a
  checkpoint): resume it, or give it up by removing its checkpoints.

A version that only *other* owners' versions derive from is deleted for its owner all the same (nobody may block
another account from deleting its own work): its folder moves to ``ROOT/archive/ID``, hidden from every listing
and ref, where the lineage of those versions still finds it by id, so they keep loading, training and verifying.
``registry gc`` removes an archived version once no version derives from it any more.

Every deleted number leaves a tombstone (``models/OWNER/NAME/retired/N``), so a number is never handed out again,
even by a counter rebuilt after damage. A model is deleted only when it has no versions and no training runs
into it (or could resume into it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import atomic
from ..errors import ConflictError, FinetuneError, IntegrityError, UsageError, VersionNotFoundError
from ..names import parse_ref
from .gc import work_name
from .manifest import Version, read_manifest

if TYPE_CHECKING:
    from .jobs import TrainingRecord, Trainings
    from .store import Model, Registry

RETIRED = "retired"  # a model's tombstones: one empty file per deleted version number
ARCHIVE = "archive"  # under the root: versions deleted by their owner that other owners' versions derive from


def owner_of(model: str) -> str:
    return model.split("/", 1)[0]


# ---------------------------------------------------------------- tombstones
def retire(model_dir: Path, number: int) -> None:
    """Leave the tombstone of version ``number`` (before its folder goes, so a crash cannot lose it)."""
    folder = model_dir / RETIRED
    folder.mkdir(exist_ok=True)
    path = folder / str(number)
    if not path.exists():
        atomic.write_bytes_durable(path, b"")
        atomic.fsync_dir(folder)


def retired_numbers(model_dir: Path) -> list[int]:
    try:
        return [int(n) for n in os.listdir(model_dir / RETIRED) if n.isdigit()]
    except (FileNotFoundError, NotADirectoryError):
        return []


# ---------------------------------------------------------------- the archive
def archive_dir(reg: Registry) -> Path:
    return reg.root / ARCHIVE


def archived(reg: Registry, version_id: object) -> Version | None:
    """The archived version with this exact id, or None (the archive is looked up by id only)."""
    if not isinstance(version_id, str) or len(version_id) != 64 or not all(c in "0123456789abcdef" for c in version_id):
        return None
    path = archive_dir(reg) / version_id
    try:
        manifest = read_manifest(path)
    except IntegrityError:
        return None
    if manifest.get("id") != version_id:
        return None
    return Version(str(manifest["model"]), int(manifest["number"]), path, manifest)


def collect_archive(reg: Registry, dry_run: bool) -> list[Path]:
    """Remove archived versions that no version (published, or archived and still needed) derives from."""
    entries = reg._listdir(archive_dir(reg))
    if not entries:
        return []
    needed = {pid for _, pid in _parent_ids(reg)}  # the live versions first: one archived meanwhile is listed below
    parents: dict[str, str | None] = {}
    for entry in reg._listdir(archive_dir(reg)):
        try:
            parent = read_manifest(Path(entry.path)).get("parent")
        except IntegrityError:
            parent = None
        parents[entry.name] = parent.get("id") if isinstance(parent, dict) else None
    grew = True
    while grew:  # an archived version that is needed keeps its own archived parent
        grew = False
        for name, pid in parents.items():
            if name in needed and pid and pid not in needed:
                needed.add(pid)
                grew = True
    removed = []
    for name in parents:
        if name not in needed:
            removed.append(archive_dir(reg) / name)
            if not dry_run:
                atomic.remove_tree(archive_dir(reg) / name)
    return removed


# ---------------------------------------------------------------- who needs a version
def _all_versions(reg: Registry) -> list[Version]:
    """Every published version, those of models whose ``model.json`` is damaged included (their versions still
    name parents)."""
    out = []
    for owner in reg._listdir(reg.root / "models"):
        for model in reg._listdir(Path(owner.path)):
            vdir = Path(model.path) / "versions"
            for entry in reg._listdir(vdir):
                if entry.name.isdigit():
                    out.append(Version(f"{owner.name}/{model.name}", int(entry.name), Path(entry.path)))
    return out


def _parent_ids(reg: Registry) -> list[tuple[Version, str]]:
    out = []
    for v in _all_versions(reg):
        try:
            parent = v.parent
        except (IntegrityError, FileNotFoundError):
            continue
        if isinstance(parent, dict) and isinstance(parent.get("id"), str):
            out.append((v, parent["id"]))
    return out


def _archived_versions(reg: Registry) -> list[Version]:
    out = []
    for entry in reg._listdir(archive_dir(reg)):
        v = archived(reg, entry.name)
        if v is not None:
            out.append(v)
    return out


def children(reg: Registry, version: Version, archive: bool = False) -> list[Version]:
    """Versions anywhere in the registry whose parent is ``version`` (by id; by ref when it is damaged); with
    ``archive``, archived versions too."""
    try:
        key, value = "id", version.id
    except IntegrityError:
        key, value = "ref", version.ref
    out = []
    for v in _all_versions(reg) + (_archived_versions(reg) if archive else []):
        try:
            parent = v.parent
        except (IntegrityError, FileNotFoundError):
            continue
        if isinstance(parent, dict) and parent.get(key) == value:
            out.append(v)
    return sorted(out, key=lambda v: (v.model, v.number))


def _uses(reg: Registry, record: TrainingRecord, version: Version) -> bool:
    """Whether a training starts from ``version``: the exact ref it resolved (once loaded), else its spec."""
    spec = record.model or str((record.input or {}).get("base_model") or "")
    try:
        ref = parse_ref(spec)
    except UsageError:
        return False  # a hub id or a folder: not a registry version
    if ref.model != version.model:
        return False
    try:
        return reg.resolve(spec) == version
    except FinetuneError:
        return False


def resumable_step(trainings: Trainings, record: TrainingRecord) -> int | None:
    """The step an interrupted training (failed, canceled, or its process gone) would resume from, when it has
    a checkpoint; None for a training that succeeded, runs, or has nothing to resume."""
    from .jobs import FINAL, Status
    from .store import completed_checkpoints

    if record.status == Status.SUCCEEDED or (record.status not in FINAL and not trainings.is_stale(record)):
        return None
    done = completed_checkpoints(trainings.paths(record.id).checkpoints)
    if not done:
        return None
    digits = done[0].name.removeprefix("step-")
    return int(digits) if digits.isdigit() else 0


def _training_users(reg: Registry, match: Callable[[TrainingRecord], bool],
                    ) -> tuple[list[TrainingRecord], list[tuple[TrainingRecord, int]]]:
    """Trainings that ``match``: those running now, and interrupted ones that could resume (with their step)."""
    from .jobs import FINAL, Trainings

    trainings = Trainings(reg)
    running, resumable = [], []
    for record in trainings.list():
        if not match(record):
            continue
        if record.status not in FINAL and (trainings.running(record) or trainings.waiting(record)):
            running.append(record)
        elif (step := resumable_step(trainings, record)) is not None:
            resumable.append((record, step))
    return running, resumable


def _refuse_for_trainings(reg: Registry, what: str, owner: str, match: Callable[[TrainingRecord], bool],
                          relation: str) -> None:
    from .jobs import Trainings

    running, resumable = _training_users(reg, match)
    trainings = Trainings(reg)
    for record in running:
        state = "still running" if trainings.running(record) else "queued"
        if owner_of(record.destination) != owner:  # never name another account's training
            raise ConflictError(f"{what} is {relation} a training of another account that is {state}",
                                "try again when it has ended")
        raise ConflictError(f"{what} is {relation} training {record.id}, which is {state}",
                            f"wait for it or cancel it (`finetune trainings cancel {record.id}`) first")
    for record, step in resumable:
        if owner_of(record.destination) != owner:
            continue  # another account's interrupted run may not block this owner for ever
        folder = reg.training_paths(record.id).checkpoints
        raise ConflictError(
            f"{what} is {relation} training {record.id}, interrupted at step {step}, which can still resume",
            f"resume it first (`finetune train --resume {record.id}`), or give it up by removing {folder}")


# ---------------------------------------------------------------- deleting
def delete_version(reg: Registry, ref: str, latest: bool) -> Path | None:
    """See :meth:`Registry.delete_version`. Returns the archive folder when the version was archived."""
    if parse_ref(ref).kind == "latest" and not latest:
        raise UsageError(f"{ref} names no version explicitly",
                         "give OWNER/NAME:N (`finetune versions list` shows them), or add --latest")
    version = reg.resolve(ref)
    m = reg.get_model(version.model)
    owner = owner_of(version.model)
    reg._ensure_writable()  # before the lock: taking it writes its file
    with reg._lock(m.path):
        if not version.path.is_dir():  # deleted by another process since it was resolved
            raise VersionNotFoundError(f"version {version.ref} not found (deleted just now)",
                                       f"see `finetune versions list {version.model}`")
        pointing = sorted(a for a, n in reg.aliases(version.model).items() if n == version.number)
        if pointing:
            raise ConflictError(f"{version.ref} has aliases: {', '.join(pointing)}",
                                "move or remove them first (`finetune versions alias --remove`)")
        kids = children(reg, version, archive=True)
        # An archived child is kept only for other owners' versions: it counts as theirs.
        own = [k for k in kids if owner_of(k.model) == owner and archive_dir(reg) not in k.path.parents]
        if own:
            raise ConflictError(f"{version.ref} is the parent of {', '.join(k.ref for k in own)}",
                                "delete those versions first")
        _refuse_for_trainings(reg, version.ref, owner, lambda r: _uses(reg, r, version), "the base of")
        archive = None
        if kids:  # only other owners' versions derive from it: archived, so that they keep working
            try:
                archive = archive_dir(reg) / version.id
            except IntegrityError:
                archive = None  # a damaged version cannot be found by id: its children are damaged already
        retire(m.path, version.number)
        target = reg._trash / work_name("version")
        os.chmod(version.path, 0o755)
        if archive is not None and not archive.exists():
            archive.parent.mkdir(exist_ok=True)
            os.rename(version.path, archive)
            os.chmod(archive, 0o555)
            atomic.fsync_dir(archive.parent)
        else:
            archive = None
            os.rename(version.path, target)
        atomic.fsync_dir(version.path.parent)
    atomic.remove_tree(target)
    return archive


def delete_model(reg: Registry, model: Model) -> None:
    """See :meth:`Registry.delete_model` (the model exists: the caller found it)."""
    name = model.full_name
    reg._ensure_writable()
    with reg._lock(model.path):
        if reg._version_numbers(model.path):
            raise ConflictError(f"model {name} still has versions", "delete them first with `finetune versions delete`")
        _refuse_for_trainings(reg, f"model {name}", owner_of(name), lambda r: r.destination == name,
                              "the destination of")
        target = reg._trash / work_name("model")
        os.rename(model.path, target)
    atomic.fsync_dir(model.path.parent)
    atomic.remove_tree(target)
