"""Prediction records: one per prediction, like a hosted service's prediction object, kept in the registry.

``predictions/ID/record.json`` holds the input, the output (a list of text pieces), logs, metrics, status and
timestamps; it is replaced atomically on every save, so a reader never sees half a record. Ids sort by
creation time, so listing is newest first. The server saves a record when its status changes and at most
about once a second while output streams; a record left ``starting``/``processing`` by a server that stopped
is settled as failed when the next one starts (:meth:`Predictions.settle_interrupted`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import NotFoundError
from ..names import check_name
from .manifest import utc_now
from .store import Registry

FINAL = ("succeeded", "failed", "canceled")
RECORD = "record.json"


class PredictionNotFoundError(NotFoundError):
    """No prediction record of that id."""


@dataclass
class PredictionRecord:
    """One prediction. ``status`` moves starting -> processing -> succeeded | failed | canceled."""

    id: str
    model: str = ""  # owner/name
    version: str = ""  # the version's 64-hex id
    version_ref: str = ""  # owner/name:N
    owner: str = ""  # the account that created it
    status: str = "starting"
    input: dict[str, Any] = field(default_factory=dict)
    output: list[str] | None = None
    logs: str = ""
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    started_at: str | None = None
    completed_at: str | None = None
    stream: bool = False
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    source: str = "api"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_prediction_id() -> str:
    """Sortable by creation time (to the microsecond) and unique."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S-%f}-{os.urandom(3).hex()}"


class Predictions:
    """Read and write prediction records in a registry."""

    kind = "predictions"

    def __init__(self, registry: Registry):
        self.registry = registry

    def root(self) -> Path:
        return self.registry.root / self.kind

    def dir(self, prediction_id: str) -> Path:
        return self.root() / check_name(prediction_id, "prediction id")

    def create(self, record: PredictionRecord) -> PredictionRecord:
        self.dir(record.id).mkdir(parents=True, exist_ok=False)
        record.created_at = record.created_at or utc_now()
        self.save(record)
        return record

    def save(self, record: PredictionRecord) -> None:
        folder = self.dir(record.id)
        atomic.replace_file(folder / RECORD, atomic.pretty_json(record.to_dict()), folder)

    def get(self, prediction_id: str) -> PredictionRecord:
        try:
            data = json.loads((self.dir(prediction_id) / RECORD).read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            raise PredictionNotFoundError(f"no prediction {prediction_id!r}") from None
        known = {f.name for f in dataclasses.fields(PredictionRecord)}
        return PredictionRecord(**{k: v for k, v in data.items() if k in known})

    def ids(self) -> list[str]:
        """Every record's id, newest first."""
        try:
            entries = sorted(os.listdir(self.root()), reverse=True)
        except FileNotFoundError:
            return []
        return [e for e in entries if (self.root() / e / RECORD).is_file()]

    def list(self) -> list[PredictionRecord]:
        """Every record, newest first."""
        return [self.get(i) for i in self.ids()]

    def settle_interrupted(self) -> list[str]:
        """Mark records a stopped server left running as failed; returns their ids. Call before serving."""
        settled = []
        for prediction_id in self.ids():
            record = self.get(prediction_id)
            if record.status not in FINAL:
                record.status, record.error = "failed", "the server stopped while this prediction ran"
                record.completed_at = utc_now()
                self.save(record)
                settled.append(prediction_id)
        return settled
