"""The training loop: one iteration per optimizer step, evaluating and checkpointing as configured, until the
last step, early stopping, or a stop request; and the evaluation it runs."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.batching import Window, real_tokens
from ..modeling.ops.loss import normalize_loss
from .checkpoint import Progress, save_checkpoint
from .guards import Stall, diverged
from .metrics import MetricsLog, Throughput
from .runlog import step_line
from .setup import Loaded, Run, Schedule, plan_steps

# The version's train_loss is the mean over this many last steps: one step's loss is one (often partial) batch's.
TRAIN_LOSS_STEPS = 20


@dataclass
class Outcome:
    """What the loop leaves for the summary."""

    last_loss: float | None = None
    last_eval: float | None = None
    tokens_per_s: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=TRAIN_LOSS_STEPS))  # last steps' losses
    trained: bool = False  # whether this process took any step (a resumed finished run takes none)
    stall: Stall = field(default_factory=Stall)
    last_stats: dict[str, float] = field(default_factory=dict)  # the last step's dpo rewards (none for sft)

    @property
    def mean_loss(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else self.last_loss


def train_loop(run: Run, loaded: Loaded, schedule: Schedule, progress: Progress, metrics: MetricsLog) -> Outcome:
    """One iteration per optimizer step, until the last step, early stopping, or a stop request."""
    tcfg, accelerator, eval_set = run.config.train, run.accelerator, loaded.prepared.eval
    outcome = Outcome(stall=Stall(same_loss=tcfg.method != "dpo"))
    if progress.step:  # resumed: the steps before come back from the metrics log (those it kept)
        outcome.recent.extend(r["loss"] for r in metrics.read() if isinstance(r.get("loss"), (int, float)))
    speed = Throughput(warmup_steps=1 if progress.step == 0 else 0)
    wall = time.perf_counter() - progress.seconds
    bar = _ProgressBar(schedule.total_steps, progress.step, enabled=run.show_progress and run.main)
    schedule.loss_model.train()
    speed.start()
    plan: tuple[int, list[Window]] = (-1, [])
    try:  # the bar ends its line before any error is printed below it
        while progress.step < schedule.total_steps and not progress.done:
            epoch, index = divmod(progress.step, schedule.steps_per_epoch)
            if plan[0] != epoch:
                plan = (epoch, plan_steps(run, loaded, epoch))
            window = plan[1][index]
            step_lr = schedule.scheduler.get_last_lr()[0]  # this step's rate; after scheduler.step() it is the next's
            loss_sum, step_tokens, grad_norm = _optimizer_step(run, schedule, loaded, window)
            progress.step += 1
            progress.tokens += step_tokens
            outcome.last_loss = float(accelerator.reduce(loss_sum.detach(), "sum")) / max(window.label_tokens, 1)
            if not math.isfinite(outcome.last_loss):  # every process holds the same reduced loss: all stop here
                raise diverged(outcome.last_loss, f"at step {progress.step} (lr {step_lr:.3g}, {run.precision})",
                               tcfg.lr)
            outcome.recent.append(outcome.last_loss)
            outcome.trained = True
            outcome.stall.step(progress.step, outcome.last_loss, grad_norm, window, step_lr, tcfg.lr)
            speed.step(step_tokens)
            row = {"step": progress.step, "epoch": round(progress.step / schedule.steps_per_epoch, 4),
                   "loss": round(outcome.last_loss, 6), "lr": step_lr, "tokens": progress.tokens,
                   "tokens_per_s": round(speed.tokens_per_second(), 1), "time_s": round(time.perf_counter() - wall, 3)}
            outcome.last_stats = schedule.take_stats()
            row.update(outcome.last_stats)
            last = progress.step == schedule.total_steps
            if eval_set is not None and (last or (tcfg.eval_every and progress.step % tcfg.eval_every == 0)):
                speed.pause()
                outcome.last_eval = _evaluate(run, schedule, eval_set, progress)
                row["eval_loss"] = round(outcome.last_eval, 6)
                row.update({f"eval_{k}": v for k, v in schedule.take_stats().items()})
                speed.resume()
            if run.main and (progress.step % tcfg.log_every == 0 or last or "eval_loss" in row):
                metrics.append(row)
                run.log.info(step_line(row, schedule.total_steps), echo=False)  # the terminal has the bar
                run.trackers.log_step(accelerator, row)
            bar.update(row)
            stop_early = bool(tcfg.early_stopping_patience and progress.bad_evals >= tcfg.early_stopping_patience)
            if tcfg.checkpoint_every and progress.step % tcfg.checkpoint_every == 0 and not last and not stop_early:
                speed.pause()
                progress.seconds = time.perf_counter() - wall
                save_checkpoint(run.paths.checkpoints, progress, schedule.model, schedule.optimizer, schedule.scheduler,
                                run.rank, run.main, accelerator.wait_for_everyone)
                speed.resume()
            run.stop.check(accelerator)
            if stop_early:
                run.log.info(f"early stopping at step {progress.step}: eval loss has not improved for "
                             f"{progress.bad_evals} evaluations")
                break
    finally:
        bar.close()
    speed.pause()
    progress.seconds = time.perf_counter() - wall
    outcome.tokens_per_s = speed.tokens_per_second()
    if outcome.last_loss is None and outcome.recent:  # resumed at its end: the figures of the run that trained
        outcome.last_loss = outcome.recent[-1]
    return outcome


def check_final_loss(run: Run, loaded: Loaded, schedule: Schedule, progress: Progress) -> None:
    """The last update is never followed by a step that would show its loss: one forward over the first batch
    tells whether it left the adapter finite (an update with a huge learning rate can overflow it)."""
    train_set, accelerator = loaded.prepared.train, run.accelerator
    examples = [train_set[j] for j in range(min(run.config.train.batch_size, len(train_set)))]
    with torch.no_grad(), accelerator.autocast():
        sums = [schedule.loss_model(**_to_device(batch, accelerator.device)) for batch in schedule.batches(examples)]
    loss = sum(float(loss_sum) for loss_sum, _ in sums) / max(sum(float(count) for _, count in sums), 1.0)
    if not math.isfinite(loss):
        lr = run.config.train.lr
        raise diverged(loss, f"after the last step ({progress.step}, lr {lr:g}, {run.precision})", lr)


def _optimizer_step(run: Run, schedule: Schedule, loaded: Loaded,
                    window: Window) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Forward and backward over one window, then the update; returns (this process's loss sum, all tokens, the
    gradient's norm before clipping)."""
    accelerator, tcfg = run.accelerator, run.config.train
    loss_sum, step_tokens = _train_step(window, loaded.prepared.train, schedule.batches, schedule.loss_model,
                                        accelerator, run.world, run.rank)
    if tcfg.max_grad_norm:
        grad_norm = accelerator.clip_grad_norm_(loaded.trainable, tcfg.max_grad_norm)
    else:  # gradients are synchronised by now: every process computes the same norm
        grads = [p.grad for p in loaded.trainable if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) \
            if grads else torch.zeros(())
    schedule.optimizer.step()
    schedule.scheduler.step()
    schedule.optimizer.zero_grad(set_to_none=True)
    step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
    return loss_sum, step_tokens, grad_norm.detach()


def _evaluate(run: Run, schedule: Schedule, eval_set: Any, progress: Progress) -> float:
    """The eval loss now, counted toward early stopping."""
    loss = evaluate(schedule.loss_model, eval_set, schedule.batches, run.config.train.batch_size, run.accelerator)
    if progress.best_eval is None or loss < progress.best_eval:
        progress.best_eval, progress.bad_evals = loss, 0
    else:
        progress.bad_evals += 1
    return loss


def _train_step(window: Window, dataset, batches: Callable, loss_model, accelerator, world: int, rank: int):
    """Forward and backward over this process's micro-batches of one window; returns (loss sum, real tokens)."""
    loss_sum = torch.zeros((), device=accelerator.device)
    tokens = 0
    inputs = []
    for indices in window.for_rank(rank, world):
        examples = [dataset[j] for j in indices]
        tokens += real_tokens(examples)
        inputs.extend(batches(examples))
    for i, batch in enumerate(inputs):
        # Gradients are synchronised across processes once per window, on its last pass.
        sync = accelerator.no_sync(loss_model) if i < len(inputs) - 1 else nullcontext()
        with sync, accelerator.autocast():
            micro_loss, _ = loss_model(**_to_device(batch, accelerator.device))
            accelerator.backward(normalize_loss(micro_loss, window.label_tokens, world))
        loss_sum += micro_loss.detach().float()
    return loss_sum, tokens


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # Sequence boundaries stay on the CPU: attention splits by them as Python ints, and reading them from a GPU
    # would wait for the device in every layer.
    return {k: v if k == "cu_seq_lens" else v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(loss_model, eval_set, batches: Callable, batch_size: int, accelerator) -> float:
    """Mean token loss over the eval set (split across processes, summed exactly)."""
    model = accelerator.unwrap_model(loss_model)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    indices = list(range(accelerator.process_index * batch_size, len(eval_set), batch_size * accelerator.num_processes))
    for start in indices:
        for batch in batches([eval_set[j] for j in range(start, min(start + batch_size, len(eval_set)))]):
            with accelerator.autocast():
                loss_sum, count = model(**_to_device(batch, accelerator.device))
            total += torch.stack([loss_sum.double(), count.double()])
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


class _ProgressBar:
    """A tqdm bar showing step, loss, tokens/s and ETA (a no-op when disabled)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, row: dict[str, Any]) -> None:
        if self._bar is not None:
            post = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if "eval_loss" in row:
                post["eval"] = f"{row['eval_loss']:.4f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
