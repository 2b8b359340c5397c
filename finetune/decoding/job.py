"""A prediction as the decoding engine runs it, and how it reports: the events of its ``emit`` callback and the
metrics of its final ``done``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..generation import GenerationSettings

Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class Job:
    """One prediction to run: its version, its prompt ids (already rendered and checked) and how to generate;
    ``max_new_tokens`` is the settings' own, held within the model's context
    (:func:`finetune.generation.bounded_new_tokens`)."""

    id: str
    ref: str  # the exact version ref (owner/name:N)
    base: str  # the base key (cache.base_key): jobs with one base share a batch
    ids: list[int]
    max_new_tokens: int
    emit: Emit
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    owner: str = ""  # the account: accounts take turns for room in a batch
    notes: list[str] = field(default_factory=list)  # said in its logs when it starts (an answer cut by the context)
    output_ids: list[int] = field(default_factory=list)  # the ids generated (without the stopping eos)
    canceled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    ended: bool = False  # its "done" was sent


def done_metrics(job: Job, generated: int, started: float, first_token: float | None, end: float) -> dict[str, Any]:
    """The metrics of a job that generated ``generated`` tokens between ``started`` and ``end`` (perf_counter
    times; ``first_token`` when its first token came, None if none did)."""
    predict = end - started
    metrics: dict[str, Any] = {
        "predict_time": round(predict, 6),
        "input_token_count": len(job.ids),
        "output_token_count": generated,
        # "length": it used every token it could (max_new_tokens, or what the context left); else it stopped
        "finish_reason": "length" if generated >= job.max_new_tokens else "stop",
    }
    if first_token is not None:
        metrics["time_to_first_token"] = round(first_token - started, 6)
        # Decoding speed: tokens after the first over the time after it (the first also pays the prefill).
        decoding = end - first_token
        metrics["tokens_per_second"] = round((generated - 1) / decoding, 3) if generated > 1 and decoding > 0 \
            else round(generated / predict, 3) if predict > 0 else 0.0
    return metrics


def finish_unstarted(job: Job, status: str, error: str | None) -> None:
    """End a job that generated nothing (canceled or failed before its first token)."""
    job.ended = True
    job.emit("done", {"status": status, "error": error, "metrics": {"input_token_count": len(job.ids),
                                                                    "output_token_count": 0}})
