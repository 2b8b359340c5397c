"""What stops a run between steps: a stall (:class:`Stall`), a diverged loss, a cancel or signal (:class:`StopFlag`)."""

from __future__ import annotations

import signal
from typing import Any

import torch

from ..data.batching import Window
from ..errors import NonFiniteError, TrainingCanceled, TrainingStalledError
from ..registry.jobs import Trainings

# A run stalls when this many steps in a row have all-zero gradients, or the same loss (relative spread below
# STALL_TOLERANCE) over different data: a model whose answer no longer depends on its input (most often after a
# learning rate far too high saturated it) learns nothing more, and its version would answer nothing.
STALL_STEPS = 5
STALL_TOLERANCE = 1e-5


class Stall:
    """Watches each step's loss and gradient norm; raises :class:`TrainingStalledError` when a run has stalled."""

    def __init__(self, same_loss: bool = True) -> None:
        # dpo starts at log 2 and a small learning rate moves it slowly: only its gradients tell a stall there
        self.same_loss = same_loss
        self.losses: list[float] = []  # the current run of (nearly) equal losses
        self.windows: set[frozenset[int]] = set()  # the rows those steps saw (in any order)
        self.zero = 0  # steps in a row with all-zero gradients

    def step(self, step: int, loss: float, grad_norm: torch.Tensor, window: Window, step_lr: float,
             lr: float) -> None:
        self.zero = self.zero + 1 if float(grad_norm) == 0.0 else 0
        if self.losses and abs(loss - self.losses[0]) > STALL_TOLERANCE * max(abs(self.losses[0]), 1e-12):
            self.losses, self.windows = [], set()
        self.losses.append(loss)
        self.windows.add(frozenset(i for batch in window.micro_batches for i in batch))
        hint = f"lower train.lr (now {lr:g}) and train again"
        if self.zero >= STALL_STEPS:
            raise TrainingStalledError(
                f"the gradients were all zero for {self.zero} steps (steps {step - self.zero + 1}-{step}, "
                f"lr {step_lr:.3g}): the adapter cannot learn any more, and the run publishes nothing", hint)
        if self.same_loss and len(self.losses) >= STALL_STEPS and len(self.windows) > 1:
            raise TrainingStalledError(
                f"the loss stayed at {loss:.4f} for {len(self.losses)} steps over different data (steps "
                f"{step - len(self.losses) + 1}-{step}, lr {step_lr:.3g}): the model gives every input the same "
                "answer and learns nothing more, and the run publishes nothing", hint)


def diverged(loss: float, when: str, lr: float) -> NonFiniteError:
    """The error that ends a run whose loss is no longer finite (``when``: at which step, with which lr)."""
    return NonFiniteError(f"the loss became {loss} {when}: the run diverged and publishes nothing",
                          f"lower train.lr (now {lr:g}), or use train.precision: fp32 if it ran in bf16 or fp16")


class StopFlag:
    """Turns SIGTERM/SIGINT and `finetune trainings cancel` into a clean stop between steps."""

    def __init__(self, trainings: Trainings, training_id: str):
        self.trainings, self.training_id = trainings, training_id
        self.signaled: str | None = None
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: rely on the cancel marker only
                pass

    def _handle(self, signum, frame) -> None:
        self.signaled = signal.Signals(signum).name

    def check(self, accelerator) -> None:
        # The marker first: `trainings cancel` also sends SIGTERM, and the record should say who stopped the run.
        reason = ("cancel requested" if self.trainings.cancel_requested(self.training_id) else None) or self.signaled
        flag = torch.tensor(1.0 if reason else 0.0, device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, "max")  # all processes stop at the same step, or none does
        if flag.item() > 0:
            raise TrainingCanceled(reason or "stopped by another process")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
