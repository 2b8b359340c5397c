"""What trainings need of the registry: the rules that keep a version or model a training uses.

This sits *above* the training records (:mod:`finetune.registry.jobs`): storage (models, versions,
:mod:`finetune.registry.deletion`) never imports them; ``Registry.delete_version``/``delete_model`` hand
storage these rules as its ``refuse`` hook, checked under the model's lock. A version or model is kept while

* a training runs from it (or into it), or waits in a server's queue to;
* an interrupted training of the same owner could still resume from it (or into it): it has a checkpoint.
  Another account's interrupted run never blocks an owner for ever (nor is it named: accounts see only theirs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConflictError, FinetuneError, IntegrityError, NotFoundError, UsageError
from ..names import parse_ref
from .deletion import owner_of
from .jobs import FINAL, Status, TrainingRecord, Trainings
from .layout import completed_checkpoints
from .manifest import Version

if TYPE_CHECKING:
    from .models import Model
    from .store import Registry


def uses(reg: Registry, record: TrainingRecord, version: Version) -> bool:
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
    if record.status == Status.SUCCEEDED or (record.status not in FINAL and not trainings.is_stale(record)):
        return None
    done = completed_checkpoints(trainings.paths(record.id).checkpoints)
    if not done:
        return None
    digits = done[0].name.removeprefix("step-")
    return int(digits) if digits.isdigit() else 0


def training_users(reg: Registry, match: Callable[[TrainingRecord], bool]
                   ) -> tuple[list[TrainingRecord], list[tuple[TrainingRecord, int]]]:
    """Trainings that ``match``: those running or queued now, and interrupted ones that could resume (with
    their step)."""
    trainings = Trainings(reg)
    running, resumable = [], []
    for record in _not_succeeded(trainings):
        if not match(record):
            continue
        if record.status not in FINAL and (trainings.running(record) or trainings.waiting(record)):
            running.append(record)
        elif (step := resumable_step(trainings, record)) is not None:
            resumable.append((record, step))
    return running, resumable


def _not_succeeded(trainings: Trainings) -> list[TrainingRecord]:
    """Every readable record but those that succeeded (which neither run nor resume), newest first: the index
    tells which those are, so that their files are not read."""
    out = []
    for record_id, status, _ in trainings.summaries():
        if status == Status.SUCCEEDED:
            continue
        try:
            out.append(trainings.get(record_id))
        except (IntegrityError, NotFoundError):  # damaged (list() leaves it out too), or removed meanwhile
            continue
    return out


def refuse_for_trainings(reg: Registry, what: str, owner: str, match: Callable[[TrainingRecord], bool],
                         relation: str) -> None:
    """Raise :class:`ConflictError` when a training that ``match``\\es still needs ``what``, saying what to do."""
    running, resumable = training_users(reg, match)
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


def keep_version(reg: Registry) -> Callable[[Version], None]:
    """The ``refuse`` hook of a version's deletion: trainings from it."""
    def refuse(version: Version) -> None:
        refuse_for_trainings(reg, version.ref, owner_of(version.model), lambda r: uses(reg, r, version),
                             "the base of")
    return refuse


def keep_model(reg: Registry) -> Callable[[Model], None]:
    """The ``refuse`` hook of a model's deletion: trainings into it."""
    def refuse(model: Model) -> None:
        name = model.full_name
        refuse_for_trainings(reg, f"model {name}", owner_of(name), lambda r: r.destination == name,
                             "the destination of")
    return refuse


def numbers_in_records(reg: Registry, model: str) -> list[int]:
    """Version numbers of ``model`` that training records say they published (a rebuilt counter passes them)."""
    out = []
    for record in Trainings(reg).list():
        ref = str((record.output or {}).get("version") or "")
        head, _, number = ref.rpartition(":")
        if head == model and number.isdigit():
            out.append(int(number))
    return out
