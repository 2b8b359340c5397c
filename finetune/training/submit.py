"""Submitting a training: check the destination and write its durable record (status ``starting``).

Kept apart from :mod:`finetune.training.run` because it needs no torch: the server submits trainings in its
request handlers and leaves the running to worker processes.
"""

from __future__ import annotations

from ..config import Config
from ..errors import ModelNotFoundError, UsageError
from ..names import parse_model_name
from ..registry import Registry
from ..registry.jobs import TrainingRecord, Trainings, new_record_id


def submit_training(
    config: Config,
    *,
    registry: Registry | None = None,
    destination: str | None = None,
    create_destination: bool = False,
    source: str = "cli",
) -> TrainingRecord:
    """Check the destination and write a durable training record (status ``starting``) for ``config``.

    Nothing is trained: :func:`run_training` runs the record (the CLI at once, the server's queue when a worker
    claims it). Raises :class:`FinetuneError` subclasses for a bad destination.
    """
    reg = registry or Registry()
    destination = destination or config.destination
    if not destination:
        raise UsageError("no destination model", "pass --destination OWNER/NAME or set `destination:` in the config")
    parse_model_name(destination)
    _ensure_destination(reg, destination, create_destination)
    return Trainings(reg).create(TrainingRecord(id=new_record_id(), destination=destination,
                                                input=config.to_dict(), source=source))


def _ensure_destination(reg: Registry, destination: str, create: bool) -> None:
    try:
        reg.check_destination(destination)  # what would fail the publish at the end fails now, before training
    except ModelNotFoundError:
        if not create:
            raise ModelNotFoundError(
                f"destination model {destination} does not exist",
                f"create it with `finetune models create {destination}` or pass --create-destination",
            ) from None
        reg.create_model(destination, exist_ok=True)
