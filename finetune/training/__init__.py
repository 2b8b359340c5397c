"""Training: the loop (``run``), its checkpoints, metrics, log, and publishing the result as a version."""

from .run import TrainResult, run_training, submit_training, train

__all__ = ["TrainResult", "run_training", "submit_training", "train"]
