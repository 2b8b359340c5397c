"""The training queue: submitted trainings run FIFO in worker processes (see :mod:`finetune.queue.queue`).

The executor is a seam (:class:`Executor`): :class:`LocalExecutor` runs workers on this machine; a cluster
engine can stand in for it without the queue changing.
"""

from .executor import Executor, Job, LocalExecutor, visible_gpus
from .queue import TrainingQueue

__all__ = ["Executor", "Job", "LocalExecutor", "TrainingQueue", "visible_gpus"]
