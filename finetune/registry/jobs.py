"""Training records: one per run, like a hosted service's training object.

A record lives in the registry's trainings folder (``Registry.training_dir(id)``) beside its log, its per-step
metrics and its checkpoints::

    record.json      id, status, model, destination, input, output, metrics, error, timestamps, pid
    train.log        what the run printed
    metrics.jsonl    one JSON object per logged step
    checkpoints/     step-N/ folders for --resume
    output/          the adapter folder that gets published
    cancel           present when `finetune trainings cancel` asked the run to stop

``record.json`` is replaced atomically on every change, so a reader never sees half a record.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import ConflictError, TrainingNotFoundError, UsageError
from .manifest import utc_now
from .store import Registry, process_alive

STATUSES = ("starting", "processing", "succeeded", "failed", "canceled")
FINAL = ("succeeded", "failed", "canceled")


@dataclass
class TrainingRecord:
    """The state of one training run. ``status`` moves starting -> processing -> succeeded|failed|canceled."""

    id: str
    status: str = "starting"
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
    resumed_from_step: int | None = None
    source: str = "cli"  # who submitted it: cli (or Python) | api
    webhook: str | None = None  # the URL that hears about this training (API trainings; see server/webhooks.py)
    webhook_events_filter: list[str] | None = None  # which events it hears (None: all)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_training_id() -> str:
    """Sortable by creation time and unique: ``YYYYMMDD-HHMMSS-xxxxxx``."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{os.urandom(3).hex()}"


class Trainings:
    """Read and write training records in a registry."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def dir(self, training_id: str) -> Path:
        return self.registry.training_dir(training_id)

    def log_path(self, training_id: str) -> Path:
        return self.dir(training_id) / "train.log"

    def metrics_path(self, training_id: str) -> Path:
        return self.dir(training_id) / "metrics.jsonl"

    def checkpoints_dir(self, training_id: str) -> Path:
        return self.dir(training_id) / "checkpoints"

    def output_dir(self, training_id: str) -> Path:
        return self.dir(training_id) / "output"

    def _cancel_marker(self, training_id: str) -> Path:
        return self.dir(training_id) / "cancel"

    def create(self, record: TrainingRecord) -> TrainingRecord:
        path = self.dir(record.id)
        path.mkdir(parents=True, exist_ok=False)
        record.created_at = record.created_at or utc_now()
        self.save(record)
        return record

    def save(self, record: TrainingRecord) -> None:
        atomic.replace_file(self.dir(record.id) / "record.json", atomic.pretty_json(record.to_dict()), self.dir(record.id))

    def get(self, training_id: str) -> TrainingRecord:
        path = self.dir(training_id) / "record.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise TrainingNotFoundError(
                f"no training {training_id!r} in {self.registry.root}", "see `finetune trainings list`"
            ) from None
        known = TrainingRecord.__dataclass_fields__
        return TrainingRecord(**{k: v for k, v in data.items() if k in known})

    def update(self, record: TrainingRecord, **changes: Any) -> TrainingRecord:
        for key, value in changes.items():
            setattr(record, key, value)
        if changes.get("status") in FINAL and not record.completed_at:
            record.completed_at = utc_now()
        self.save(record)
        return record

    def list(self) -> list[TrainingRecord]:
        """Every record, newest first."""
        root = self.registry.trainings_dir()
        if not root.is_dir():
            return []
        out = []
        for entry in sorted(os.listdir(root), reverse=True):
            if (root / entry / "record.json").is_file():
                out.append(self.get(entry))
        return out

    # ---------------------------------------------------------------- cancellation
    def request_cancel(self, training_id: str) -> TrainingRecord:
        """Ask a running training to stop; it ends as ``canceled`` without publishing."""
        record = self.get(training_id)
        if record.status in FINAL:
            raise ConflictError(f"training {training_id} already {record.status}")
        self._cancel_marker(training_id).touch()
        if record.pid and process_alive(record.pid):
            # The marker is the contract (works across hosts and for all ranks); the signal wakes the run up.
            try:
                os.kill(record.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif record.status in ("starting", "processing"):
            # Nobody is running it any more (killed, machine rebooted): settle the record now.
            self.update(record, status="canceled", error="canceled (the training process was not running)")
        return record

    def cancel_requested(self, training_id: str) -> bool:
        return self._cancel_marker(training_id).exists()

    def clear_cancel(self, training_id: str) -> None:
        self._cancel_marker(training_id).unlink(missing_ok=True)

    def is_stale(self, record: TrainingRecord) -> bool:
        """A record that says it runs, whose process is gone (killed -9, crashed machine)."""
        return record.status not in FINAL and not (record.pid and process_alive(record.pid))

    # ---------------------------------------------------------------- logs
    def follow_log(self, training_id: str, follow: bool, poll_s: float = 0.5) -> Iterator[str]:
        """Yield the log's lines; with ``follow``, keep yielding until the training ends."""
        path = self.log_path(training_id)
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
    if record.status == "succeeded":
        raise UsageError(f"training {record.id} already succeeded (published {record.output and record.output.get('version')})")
    if record.status not in FINAL and not trainings.is_stale(record):
        raise ConflictError(f"training {record.id} is still running (pid {record.pid})", "cancel it first or wait")
