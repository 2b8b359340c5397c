"""Job records: one per run of a job (a training, a prediction), like a hosted service's objects.

:class:`RecordStore` keeps the records of one kind of job, each in its own folder under the registry root (the
layout is drawn in :mod:`finetune.registry.layout`): ``record.json`` replaced atomically on every change, listing
newest first (ids sort by creation time). :class:`Trainings` adds what a training needs: its files
(:class:`~finetune.registry.layout.TrainingPaths`), the process that runs it, cancellation, staleness and the log.

A training's process is named by its pid *and* its start mark (:mod:`finetune.processes`): a pid freed
by a dead run and taken by another process is never signalled, nor taken for the run.
"""

from __future__ import annotations

import builtins
import dataclasses
import datetime as _dt
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from .. import atomic
from ..errors import ConflictError, IntegrityError, NotFoundError, TrainingNotFoundError, UsageError
from ..processes import ProcessRef
from ..supervisor import notify
from .layout import RECORD, TrainingPaths
from .manifest import utc_now

if TYPE_CHECKING:
    from .store import Registry


class Status(str, Enum):
    """Where a job stands: starting -> processing -> succeeded | failed | canceled. Stored as the plain value."""

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# Tuples, not sets: a plain string compares equal to its member but does not hash like it.
STATUSES = tuple(Status)
FINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELED)


def new_record_id() -> str:
    """Sortable by creation time and unique: ``YYYYMMDD-HHMMSS-xxxxxx``."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{os.urandom(3).hex()}"


class JobRecord(Protocol):
    """What every kind of job record has (trainings, predictions): a dataclass with these fields."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    id: str
    status: Status
    created_at: str


R = TypeVar("R", bound=JobRecord)


class RecordStore(Generic[R]):
    """Read and write the records (dataclasses with ``id`` and ``created_at``) of one kind of job.

    Subclasses name the ``kind`` (a folder in :data:`~finetune.registry.layout.JOB_KINDS`), the ``record_type``,
    and the error raised for an unknown id.
    """

    kind: str = ""
    record_type: type[R]
    not_found: type[NotFoundError] = NotFoundError
    not_found_hint: str | None = None

    def __init__(self, registry: Registry):
        self.registry = registry

    def dir(self, record_id: str) -> Path:
        return self.registry.job_dir(self.kind, record_id)

    def create(self, record: R) -> R:
        """Store a new record (its folder must not exist yet)."""
        self.dir(record.id).mkdir(parents=True, exist_ok=False)
        record.created_at = record.created_at or utc_now()
        self.save(record)
        return record

    def save(self, record: R) -> None:
        folder = self.dir(record.id)
        atomic.replace_file(folder / RECORD, atomic.pretty_json(asdict(record)), folder)
        # Committed: the index may now remember it (a crash before this line leaves a stamp that is read again).
        self.registry.catalog.note(self.kind, "", record.id, folder / RECORD, _summary(record))

    def get(self, record_id: str) -> R:
        path = self.dir(record_id) / RECORD
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise self.not_found(
                f"no {self.kind.removesuffix('s')} {record_id!r} in {self.registry.root}", self.not_found_hint
            ) from None
        except (ValueError, OSError) as err:  # JSON or UTF-8 errors, an unreadable file
            raise self._damaged(path, f"{type(err).__name__}: {err}") from None
        # Fields this version does not know (written by a newer one) are left out on reading, never on writing.
        known = {f.name for f in dataclasses.fields(self.record_type)}
        try:
            return self.record_type(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError, AttributeError) as err:  # not an object, a field missing or out of range
            raise self._damaged(path, f"{type(err).__name__}: {err}") from None

    def _damaged(self, path: Path, why: str) -> IntegrityError:
        return IntegrityError(f"{path} is damaged ({why[:200]})",
                              f"restore it, or remove its folder {path.parent} (it holds only this record's files)")

    def update(self, record: R, **changes: Any) -> R:
        """Change fields of ``record`` and store it; ``record`` itself is updated too (callers hold it).

        An unknown field is an error (a typo would otherwise be written nowhere without a word).
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(record)})
        if unknown:
            raise TypeError(f"{type(record).__name__} has no field {', '.join(unknown)}")
        updated = dataclasses.replace(record, **changes)  # runs the record's own checks (__post_init__)
        self.save(updated)
        record.__dict__.update(updated.__dict__)
        return record

    def list(self) -> list[R]:
        """Every readable record, newest first (a damaged one is left out: :meth:`damaged` names those)."""
        out = []
        for entry in self.ids():
            try:
                out.append(self.get(entry))
            except IntegrityError:
                continue
        return out

    def damaged(self) -> builtins.list[IntegrityError]:
        """The errors of records that cannot be read, newest first (what :meth:`list` left out)."""
        out = []
        for entry in self.ids():
            try:
                self.get(entry)
            except IntegrityError as err:
                out.append(err)
        return out

    # Whether a record that ended never changes again (then the index's word on it needs no stat at all).
    ended_is_settled = False

    def summaries(self) -> builtins.list[tuple[str, str, str]]:  # (``list`` is a method here)
        """``(id, status, owner)`` of every readable record, newest first, from the index for records unchanged
        since it last saw them (:mod:`finetune.registry.catalog`): no record file is read for those."""
        try:
            names = sorted(os.listdir(self.registry.jobs_dir(self.kind)), reverse=True)
        except FileNotFoundError:
            return []
        texts = self.registry.catalog.cached(self.kind, "", names, self.registry.layout.record_file_of(self.kind),
                                             self._load_summary, settled=_ended if self.ended_is_settled else None)
        out = []
        for name in names:
            text = texts[name]
            if text is not None:
                status, _, owner = text.partition("\n")
                out.append((name, status, owner))
        return out

    def _load_summary(self, record_id: str, path: str) -> str | None:
        try:
            return _summary(self.get(record_id))
        except (IntegrityError, UsageError):
            return None  # damaged (or a stray folder name): left out, as list() leaves it out

    def unfinished(self, summaries: builtins.list[tuple[str, str, str]] | None = None) -> builtins.list[R]:
        """Every readable record that has not ended (starting, processing), newest first: what a server's start
        looks at. Only those records are read (the index tells the others), and each is read: the truth.
        ``summaries``: as :meth:`summaries` just returned them (so that a caller needing both lists once)."""
        out = []
        for record_id, status, _ in self.summaries() if summaries is None else summaries:
            if status in FINAL:
                continue
            try:
                record = self.get(record_id)
            except (IntegrityError, NotFoundError):  # damaged or removed since it was listed
                continue
            if record.status not in FINAL:
                out.append(record)
        return out

    def ids(self) -> builtins.list[str]:
        """Every record's id (a folder with a record file), newest first."""
        try:
            entries = sorted(os.listdir(self.registry.jobs_dir(self.kind)), reverse=True)
        except FileNotFoundError:
            return []
        file_of = self.registry.layout.record_file_of(self.kind)
        return [entry for entry in entries if os.path.isfile(file_of(entry))]


def _summary(record: Any) -> str:
    """What the index remembers of a record, ``STATUS\\nOWNER``: enough for a server's start and per-owner
    listings (neither a status nor an owner name holds a newline)."""
    return f"{record.status}\n{getattr(record, 'owner', '')}"


_ENDED = tuple(f"{status.value}\n" for status in FINAL)


def _ended(summary: str) -> bool:
    return summary.startswith(_ENDED)


@dataclass
class TrainingRecord:
    """The state of one training run. ``status`` moves starting -> processing -> succeeded|failed|canceled."""

    id: str
    status: Status = Status.STARTING
    model: str = ""  # the base model as resolved (a registry ref, hub id@revision, or a folder)
    destination: str = ""
    input: dict[str, Any] = field(default_factory=dict)  # the resolved config
    output: dict[str, Any] | None = None  # {"version": ref, "weights": path} on success
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    created_at: str = ""
    started_at: str | None = None
    completed_at: str | None = None
    pid: int | None = None
    pid_mark: str | None = None  # the start mark of process ``pid`` (see finetune.processes): pids get reused
    host: str | None = None  # the machine process ``pid`` runs on (a cluster's node): pids mean something there only
    runner: str | None = None  # "queue": a server's queue worker runs it (a server adopts only those); else None
    resumed_from_step: int | None = None
    source: str = "cli"  # who submitted it: cli (or Python) | api
    webhook: str | None = None  # the URL that hears about this training (API trainings; see server/webhooks.py)
    webhook_events_filter: list[str] | None = None  # which events it hears (None: all)
    # Where a cluster executor ran it (finetune.cluster): executor, host and node_id (its first process), nodes
    # (every process), attempts, the nodes it lost, and the actor running it now. None: run on this machine.
    placement: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # ValueError for a status that does not exist

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A queue's worker processes carry this variable (value "queue"), so the record of the run they claim says so.
RUNNER_ENV = "FINETUNE_RUNNER"
# Trainings submitted to a server's queue: one that has not ended and is not running waits for a queue worker
# (now, or after the next server start: queued trainings survive restarts).
QUEUED_SOURCES = ("api", "web")


class Trainings(RecordStore[TrainingRecord]):
    """Read and write training records in a registry."""

    kind = "trainings"
    record_type = TrainingRecord
    not_found = TrainingNotFoundError
    not_found_hint = "see `finetune trainings list`"

    def paths(self, training_id: str) -> TrainingPaths:
        return self.registry.training_paths(training_id)

    def update(self, record: TrainingRecord, **changes: Any) -> TrainingRecord:
        if changes.get("status") in FINAL and not record.completed_at and "completed_at" not in changes:
            changes["completed_at"] = utc_now()
        updated = super().update(record, **changes)
        status = updated.status
        notify("status", training_id=updated.id, status=getattr(status, "value", status))  # under a supervisor
        return updated

    # ---------------------------------------------------------------- the process that runs it
    def claim(self, record: TrainingRecord) -> TrainingRecord:
        """Mark ``record`` as run by this process from now on (status ``starting`` until it trains)."""
        me = ProcessRef.current()
        return self.update(record, status=Status.STARTING, pid=me.pid, pid_mark=me.mark, host=me.host,
                           runner=os.environ.get(RUNNER_ENV) or None, error=None, completed_at=None)

    def process(self, record: TrainingRecord) -> ProcessRef | None:
        """The process that claimed ``record`` (None when none did); :meth:`ProcessRef.alive` says whether it
        still runs, and it is the one signalled, never a process that took its pid since."""
        if not isinstance(record.pid, int) or record.pid <= 0:  # none yet (or a hand-edited record's nonsense)
            return None
        written_at = None
        if record.pid_mark is None:  # a record written before marks: its file's age stands in (see processes)
            try:
                written_at = (self.dir(record.id) / RECORD).stat().st_mtime
            except OSError:
                written_at = None
        return ProcessRef(record.pid, record.pid_mark, written_at, record.host)

    def running(self, record: TrainingRecord) -> bool:
        """Whether the process that claimed ``record`` still runs (whatever the record's status says). A run on
        another machine (a cluster's node) cannot be seen from here: it counts as running until its record ends
        (the cluster executor ends the record of a run whose node was lost)."""
        proc = self.process(record)
        if proc is not None and not proc.local:
            return record.status not in FINAL
        return proc is not None and proc.alive()

    # ---------------------------------------------------------------- cancellation
    def request_cancel(self, training_id: str) -> TrainingRecord:
        """Ask a running training to stop; it ends as ``canceled`` without publishing."""
        record = self.get(training_id)
        if record.status in FINAL:
            raise ConflictError(f"training {training_id} already {record.status}")
        self.paths(training_id).cancel.touch()
        proc = self.process(record)
        # The marker is the contract (works across hosts and for all ranks); the signal wakes the run up.
        if proc is not None and not proc.local:
            return record  # on another machine: the run sees the marker within a step and ends itself
        woken = proc is not None and proc.send(signal.SIGTERM)
        if not woken and record.status in (Status.STARTING, Status.PROCESSING):
            # Nobody is running it any more (killed, machine rebooted): settle the record now.
            self.update(record, status=Status.CANCELED, error="canceled (the training process was not running)")
        return record

    def cancel_requested(self, training_id: str) -> bool:
        return self.paths(training_id).cancel.exists()

    def clear_cancel(self, training_id: str) -> None:
        self.paths(training_id).cancel.unlink(missing_ok=True)

    def waiting(self, record: TrainingRecord) -> bool:
        """Whether ``record`` waits in a server's queue (queued, or interrupted and queued again): it will run."""
        return record.status not in FINAL and record.source in QUEUED_SOURCES and not self.running(record)

    def is_stale(self, record: TrainingRecord) -> bool:
        """A record that says it runs, whose process is gone (killed -9, crashed machine)."""
        return record.status not in FINAL and not self.running(record)

    # ---------------------------------------------------------------- logs
    def follow_log(self, training_id: str, follow: bool, poll_s: float = 0.5) -> Iterator[str]:
        """Yield the log's lines; with ``follow``, keep yielding until the training ends."""
        path = self.paths(training_id).log
        self.get(training_id)  # a clear error for an unknown id
        while not path.exists():
            if not follow:
                return
            time.sleep(poll_s)
        with open(path, encoding="utf-8", errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                if not follow:
                    return
                record = self.get(training_id)
                if record.status in FINAL or self.is_stale(record):
                    rest = f.read()
                    yield from rest.splitlines()
                    return
                time.sleep(poll_s)


def check_resumable(trainings: Trainings, record: TrainingRecord) -> None:
    """Only a run that did not finish, and is not running now, can be resumed."""
    if record.status == Status.SUCCEEDED:
        published = record.output and record.output.get("version")
        raise UsageError(f"training {record.id} already succeeded (published {published})")
    if record.status not in FINAL and not trainings.is_stale(record):
        raise ConflictError(f"training {record.id} is still running (pid {record.pid})", "cancel it first or wait")
