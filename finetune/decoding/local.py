"""Generation in this process: the serving engine run over one version loaded here, synchronously.

``finetune predict``, ``finetune chat``, comparisons and the Python API (:func:`finetune.inference.generate`)
generate exactly as the HTTP API does: the same :class:`~finetune.decoding.engine.Engine` (its prefill and
decoding steps, its sampling with a generator seeded per request, its eos and stop-sequence rules, its
streamed text), over the version as :func:`finetune.inference.load_version` loaded it, without a server, a
worker or a background thread. So one seed gives one answer, whichever way it was asked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..errors import FinetuneError
from ..generation import GenerationSettings, bounded_new_tokens
from ..modeling.context import context_length
from .cache import BASE_ADAPTER, LoadedBase, Servable
from .engine import Engine, Job


class _Here:
    """What the engine asks of its cache, for the one version loaded in this process: it is always there."""

    def __init__(self, loaded: Any):
        from ..loading import eos_ids

        model = loaded.model
        peft = hasattr(model, "peft_config")  # finetune.load(merge=False): the adapter beside the base weights
        adapter = model.active_adapter if peft else BASE_ADAPTER
        self.base = LoadedBase(f"here:{loaded.version.id}", model, loaded.tokenizer, loaded.device,
                               loaded.precision, context_of(loaded), nbytes=0,
                               adapters={adapter} if peft else set())
        self.servable = Servable(loaded.version, self.base, adapter, loaded, eos_ids(loaded), nbytes=0)

    def acquire(self, ref: str, log: Any = None) -> tuple[Servable, bool]:
        return self.servable, False

    def release(self, servable: Servable) -> None:
        pass


def context_of(loaded: Any) -> int | None:
    """The context length of a loaded version (:func:`finetune.modeling.context.context_length`)."""
    return context_length(getattr(loaded.model, "config", None), loaded.tokenizer)


def generate_ids(loaded: Any, ids: Sequence[int], settings: GenerationSettings) -> tuple[list[int], str]:
    """The new token ids after ``ids`` (without the stopping eos) and their text (up to a stop sequence), as the
    serving engine generates them for a prediction with these settings.

    ``settings`` are checked first; a prompt that fills the model's context, or ``max_new_tokens`` past the
    whole context, is a :class:`~finetune.errors.UsageError`; an answer that would run past the context stops at
    its end (a warning says so). A generation that fails raises :class:`~finetune.errors.FinetuneError`.
    """
    settings = settings.check()
    max_new, note = bounded_new_tokens(loaded.version.ref, context_of(loaded), len(ids), settings.max_new_tokens)
    if note:
        logging.getLogger("finetune").warning(note)
    pieces: list[str] = []
    ended: dict[str, Any] = {}

    def emit(kind: str, payload: dict[str, Any]) -> None:
        if kind == "output":
            pieces.append(payload["text"])
        elif kind == "done":
            ended.update(payload)

    here = _Here(loaded)
    job = Job("here", loaded.version.ref, here.base.key, list(ids), max_new, emit, settings=settings)
    Engine(here, max_batch=1).run_here(job)  # type: ignore[arg-type]  # _Here is the part of a cache it uses
    if ended.get("status") != "succeeded":
        raise FinetuneError(f"generating with {loaded.version.ref} failed: {ended.get('error') or 'it stopped'}")
    return job.output_ids, "".join(pieces)
