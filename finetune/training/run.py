"""The training run: LoRA on a frozen base, driven by accelerate, publishing a new version when it succeeds.

``submit_training`` writes a durable training record; ``run_training`` runs one (``train`` does both, as the CLI
does). A run is a few stages over typed state (:class:`~finetune.training.setup.Run`, then
:class:`~finetune.training.setup.Loaded`, :class:`~finetune.training.setup.Schedule` and the checkpointed
:class:`~finetune.training.checkpoint.Progress`), read top to bottom in :func:`_train`: load model and data, plan
the optimizer steps (each a window of micro-batches; see :mod:`finetune.data.batching`), resume from a checkpoint
(all in :mod:`~finetune.training.setup`), loop (:mod:`~finetune.training.loop`: evaluating and checkpointing as
configured, stopped by :mod:`~finetune.training.guards`), publish the adapter to the destination (here).
Every process of an ``accelerate launch`` runs this; only the main process writes the record, the metrics and
the version. ``train.method: dpo`` changes three things only: the data (preference pairs, ``data.preference``),
the loss module (:class:`~finetune.training.dpo.DpoLoss`, with the same ``(sum, count)`` interface as the
supervised loss, so the loop, evaluation and checkpoints are shared) and the extra figures each step logs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from .. import atomic
from ..config import Config, config_from_dict
from ..errors import FinetuneError, RegistryAccessError, TrainingCanceled, UsageError, one_line
from ..registry import Registry, Version
from ..registry.jobs import Status, TrainingRecord, Trainings, check_resumable
from ..registry.manifest import utc_now
from .checkpoint import Progress, save_checkpoint
from .loop import Outcome, check_final_loss, train_loop
from .metrics import MetricsLog, peak_memory_mb
from .runlog import RunLog, quiet_libraries
from .setup import Loaded, Run, Schedule, build_schedule, load_run, open_run, resume
from .submit import submit_training


@dataclass
class TrainResult:
    record: TrainingRecord
    version: Version | None  # None on processes other than the main one


def train(
    config: Config,
    *,
    registry: Registry | None = None,
    destination: str | None = None,
    create_destination: bool = False,
    progress: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> TrainResult:
    """Submit ``config`` and run it here: :func:`submit_training` then :func:`run_training`.

    Every process of an ``accelerate launch`` calls this; only the main process writes the record. ``on_start``
    is called with the training id as soon as the record exists (main process only).
    """
    reg = registry or Registry()
    state = PartialState(cpu=not torch.cuda.is_available())
    check_processes(config, state.num_processes)  # before a record exists: nothing to clean up
    shared: list[str | None] = [None]
    if state.is_main_process:
        shared[0] = submit_training(config, registry=reg, destination=destination,
                                    create_destination=create_destination).id
    broadcast_object_list(shared)
    assert shared[0] is not None
    if on_start is not None and state.is_main_process:
        on_start(shared[0])
    return run_training(shared[0], registry=reg, progress=progress)


def run_training(training_id: str, *, registry: Registry | None = None, progress: bool = True) -> TrainResult:
    """Run the training record ``training_id`` and publish its adapter as the next version of its destination.

    A new record (from :func:`submit_training`) starts from step 0; a killed, failed or canceled one continues
    from its newest checkpoint (``finetune train --resume``). A record that already published settles as
    ``succeeded`` without training again. Raises :class:`FinetuneError` subclasses for bad input; the record
    ends ``failed`` or ``canceled`` and nothing is published in those cases.
    """
    quiet_libraries()
    reg = registry or Registry()
    trainings = Trainings(reg)
    state = PartialState(cpu=not torch.cuda.is_available())

    # ---- the record: checked and claimed by the main process (the others would race its claim), then shared
    verdict: list[Any] = [None]
    if state.is_main_process:
        verdict[0] = _claim(reg, trainings, training_id)
    broadcast_object_list(verdict)
    if isinstance(verdict[0], FinetuneError):
        raise verdict[0]
    if isinstance(verdict[0], Version):  # it had published already: settled, nothing to train
        return TrainResult(trainings.get(training_id), verdict[0] if state.is_main_process else None)
    run = open_run(reg, trainings, training_id, state, show_progress=progress)
    record, log = run.record, run.log
    succeeded = False
    try:
        version = _train(run)
        succeeded = True
    except (KeyboardInterrupt, TrainingCanceled) as err:
        _finish(trainings, record, Status.CANCELED, error=f"canceled: {err}" if str(err) else "canceled", log=log)
        raise TrainingCanceled(f"training {training_id} canceled; no version published") from None
    except FinetuneError as err:
        _finish(trainings, record, Status.FAILED, error=str(err), log=log)
        raise
    except Exception as err:
        if atomic.out_of_space(err, reg.root):  # the final save or the publish: one line that says what to do
            full = RegistryAccessError(
                f"the registry at {reg.root} ran out of space ({one_line(err, 120)}); nothing published",
                f"free space on its disk, then `finetune train --resume {training_id}` (it continues from its last "
                "checkpoint)")
            _finish(trainings, record, Status.FAILED, error=str(full), log=log)
            raise full from None
        _finish(trainings, record, Status.FAILED, error=f"{type(err).__name__}: {err}", log=log)
        raise
    finally:
        run.trackers.finish(run.accelerator, succeeded)
        run.stop.restore()
        log.close()
    return TrainResult(trainings.get(training_id) if state.is_main_process else record, version)


def check_processes(config: Config, world: int) -> None:
    """``train.processes`` is part of the global batch: a run started with another number of processes would
    train something else than its config says, so it is refused."""
    wanted = config.train.processes
    if wanted is not None and wanted != world:
        raise UsageError(
            f"train.processes is {wanted}, but this run has {world} process{'es' if world > 1 else ''}",
            f"start it with `python -m finetune.launch --num-processes {wanted}`, or on a server started with "
            f"`finetune serve --executor ray`; or remove train.processes")


def _claim(reg: Registry, trainings: Trainings, training_id: str) -> FinetuneError | Version | None:
    """Check that the record may run and mark it as run by this process. Returns the error that forbids it, the
    version it already published (the record is settled as succeeded), or None: go on."""
    try:
        record = trainings.get(training_id)
        check_resumable(trainings, record)
        config_from_dict(record.input, source=f"training {training_id}")
        reg.check_destination(record.destination)  # the publish at the end must not be the first to find out
    except FinetuneError as err:
        return err
    published = reg.published_by(record.destination, record.id)
    if published is not None:  # killed after publishing, before the record said so: settle, never republish
        trainings.update(record, status=Status.SUCCEEDED,
                         output={"version": published.ref, "weights": str(published.path)})
        return published
    trainings.claim(record)
    trainings.clear_cancel(training_id)
    return None


def _train(run: Run) -> Version | None:
    run.log.info(f"training {run.training_id} -> {run.destination} ({run.world} "
                 f"process{'es' if run.world > 1 else ''}, {run.accelerator.device.type}, {run.precision})")
    check_processes(run.config, run.world)
    loaded = load_run(run)
    schedule = build_schedule(run, loaded)
    metrics = MetricsLog(run.paths.metrics)
    progress = resume(run, loaded, schedule, metrics)
    run.trackers.start(run.accelerator, run.config.to_dict(), progress.step)
    for note in run.trackers.notes:
        run.log.info(f"reporting to {note}")
    run.stop.check(run.accelerator)  # a cancel that arrived while loading ends the run before its first step
    run.update_record(status=Status.PROCESSING, started_at=(run.record and run.record.started_at) or utc_now())
    outcome = train_loop(run, loaded, schedule, progress, metrics)
    if outcome.trained:
        check_final_loss(run, loaded, schedule, progress)
    progress.done = True
    if outcome.trained:  # the finished state, so a resume after a failed publish publishes it without retraining
        save_checkpoint(run.paths.checkpoints, progress, schedule.model, schedule.optimizer, schedule.scheduler,
                        run.rank, run.main, run.accelerator.wait_for_everyone)
    return _publish(run, loaded, schedule, progress, outcome, metrics)


def _publish(run: Run, loaded: Loaded, schedule: Schedule, progress: Progress, outcome: Outcome,
             metrics: MetricsLog) -> Version | None:
    """The adapter as the destination's next version (main process only), and the record marked succeeded."""
    accelerator = run.accelerator
    summary = {"train_loss": outcome.mean_loss, "train_loss_steps": len(outcome.recent) or 1,
               "last_step_loss": outcome.last_loss,
               "eval_loss": outcome.last_eval, "best_eval_loss": progress.best_eval,
               "steps": progress.step, "trained_tokens": progress.tokens,
               "tokens_per_s": round(outcome.tokens_per_s, 1), "total_time_s": round(progress.seconds, 2),
               "precision": run.precision, "packing": loaded.packing, "processes": run.world,
               "device": accelerator.device.type,
               "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
               "method": run.config.train.method, **outcome.last_stats}
    accelerator.wait_for_everyone()
    if not run.main:
        return None
    from .publishing import publish_adapter  # looked up here: tests replace it on its module

    assert run.record is not None
    run.trackers.log_final(accelerator, summary, progress.step)
    version = publish_adapter(
        run.registry, run.trainings, run.record, run.destination, schedule.model, loaded.tokenizer, run.config,
        loaded.resolved, loaded.prepared.info, summary, metrics,
    )
    # The log line first: whoever sees the final status reads a log that already says it (as _finish does).
    run.log.info(f"published {version.ref} ({version.id[:12]})")
    run.update_record(status=Status.SUCCEEDED, metrics=summary,
                      output={"version": version.ref, "weights": str(version.path)})
    return version


def _finish(trainings: Trainings, record: TrainingRecord | None, status: Status, error: str, log: RunLog) -> None:
    # To the log file only: the error propagates, and the command line prints it once, as its error line.
    log.info(error if error.startswith(f"{status}:") else f"{status}: {error}", echo=False)
    if record is None:
        return
    try:
        trainings.update(record, status=status, error=error)
    except OSError:
        # A full disk: free what this run alone holds (the adapter folder a publish would copy, a half-written
        # checkpoint; a resume rebuilds both), then record the end, which must not stay "processing".
        paths = trainings.paths(record.id)
        atomic.remove_tree(paths.output)
        for tmp in paths.checkpoints.glob(".tmp-step-*"):
            atomic.remove_tree(tmp)
        try:
            trainings.update(record, status=status, error=error)
        except OSError:
            pass  # nothing left to free: the error still reaches the caller, and the record shows its process gone
