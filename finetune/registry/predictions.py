"""Prediction records: one per prediction, like a hosted service's prediction object, kept in the registry.

``predictions/ID/record.json`` holds the input, the output (a list of text pieces), logs, metrics, status and
timestamps; it is replaced atomically on every save, so a reader never sees half a record. Ids sort by
creation time, so listing is newest first. The server saves a record when its status changes and at most
about once a second while output streams; a record left ``starting``/``processing`` by a server that stopped
is settled as failed when the next one starts (:meth:`Predictions.settle_interrupted`).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import NotFoundError
from .jobs import FINAL, RecordStore, Status
from .manifest import utc_now
from .store import RECORD


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
    status: Status = Status.STARTING
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
    placement: dict[str, Any] | None = None  # where it ran, on a Ray cluster: executor, actor, host, node_id

    def __post_init__(self) -> None:
        self.status = Status(self.status)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_prediction_id() -> str:
    """Sortable by creation time (to the microsecond) and unique."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S-%f}-{os.urandom(3).hex()}"


class Predictions(RecordStore[PredictionRecord]):
    """Read and write prediction records in a registry."""

    kind = "predictions"
    record_type = PredictionRecord
    not_found = PredictionNotFoundError
    not_found_hint = "see GET /v1/predictions"

    def ids(self) -> list[str]:
        """Every record's id, newest first."""
        root = self.registry.jobs_dir(self.kind)
        try:
            entries = sorted(os.listdir(root), reverse=True)
        except FileNotFoundError:
            return []
        return [e for e in entries if (root / e / RECORD).is_file()]

    def settle_interrupted(self) -> list[str]:
        """Mark records a stopped server left running as failed; returns their ids. Call before serving."""
        settled = []
        for prediction_id in self.ids():
            record = self.get(prediction_id)
            if record.status not in FINAL:
                self.update(record, status=Status.FAILED, error="the server stopped while this prediction ran",
                            completed_at=utc_now())
                settled.append(prediction_id)
        return settled
