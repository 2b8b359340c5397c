"""A prediction in flight: its record, who waits for it and who streams it, and what its end looks like.

:class:`~finetune.serving.service.PredictionService` keeps one :class:`LivePrediction` per prediction from
``create`` until its worker reports the end; the helpers here turn a worker's answers into what clients see
(the final stream event, the error a rejection raises).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from ..errors import FinetuneError, UnavailableError
from ..registry.predictions import PredictionRecord
from .signals import Signal

Subscribers = list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]]


@dataclass
class LivePrediction:
    """A prediction the service is running: its record and who waits for it."""

    record: PredictionRecord
    worker: Any = None
    admitted: Signal = field(default_factory=Signal)
    rejection: dict[str, Any] | None = None
    finished: Signal = field(default_factory=Signal)
    subscribers: Subscribers = field(default_factory=list)
    base_url: str = ""  # the server's URL as the creating client saw it, for the links in webhooks
    saved_at: float = 0.0
    webhook_at: float = 0.0


def publish(targets: Subscribers, event: str, data: str) -> None:
    """Hand ``(event, data)`` to each streaming client on its own event loop."""
    for loop, q in targets:
        try:
            loop.call_soon_threadsafe(q.put_nowait, (event, data))
        except RuntimeError:  # that client's event loop is closed
            pass


def final_event(record: PredictionRecord) -> tuple[str, str]:
    """The stream's last event for an ended prediction: ``error`` with the reason, or ``done``."""
    if record.status == "failed":
        return "error", record.error or "the prediction failed"
    return "done", "{}" if record.status == "succeeded" else '{"reason": "canceled"}'


def copy_record(record: PredictionRecord) -> PredictionRecord:
    """A copy a reader may keep while the worker's events go on changing the live record."""
    data = record.to_dict()
    return PredictionRecord(**data)


class PredictionRejected(FinetuneError):
    """A worker refused a prediction's input (e.g. a prompt longer than the model's context)."""

    http_status = 422


def rejection_error(payload: dict[str, Any]) -> FinetuneError:
    """The error ``create`` raises for a worker's ``rejected`` answer (503 when the worker died first)."""
    if payload.get("status") == 503:
        return UnavailableError(payload.get("detail") or "the inference worker stopped")
    err = PredictionRejected(payload.get("detail") or "the input was rejected")
    err.http_status = int(payload.get("status") or 422)
    return err


def seconds_between(start: str, end: str) -> float:
    """Seconds from one record timestamp to another (0 when either cannot be read)."""
    import datetime as dt

    try:
        a = dt.datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = dt.datetime.fromisoformat(end.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return 0.0
    return max(0.0, (b - a).total_seconds())
