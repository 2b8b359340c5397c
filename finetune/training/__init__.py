"""Training: the run (``run``, from its ``setup`` through the ``loop`` and its ``guards``), its checkpoints,
metrics, log, and publishing the result as a version.

``submit_training`` (``submit``) needs no torch; the rest is imported on first use, so that code which only
submits (the server) does not pay for torch.
"""

from typing import Any

from .submit import submit_training

__all__ = ["TrainResult", "run_training", "submit_training", "train"]


def __getattr__(name: str) -> Any:
    if name in ("TrainResult", "run_training", "train"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
