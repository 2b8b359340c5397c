"""The training run: LoRA on a frozen base, driven by accelerate, publishing a new version when it succeeds.

``submit_training`` writes a durable training record; ``run_training`` runs one (``train`` does both, as the CLI
does). A run is a few stages over typed state (:class:`_Run`, then :class:`_Loaded`, :class:`_Schedule` and the
checkpointed :class:`~finetune.training.checkpoint.Progress`), read top to bottom in :func:`_train`: load model
and data, plan the optimizer steps (each a window of micro-batches; see :mod:`finetune.data.batching`), resume
from a checkpoint, loop (evaluating and checkpointing as configured), publish the adapter to the destination.
Every process of an ``accelerate launch`` runs this; only the main process writes the record, the metrics and
the version. ``train.method: dpo`` changes three things only: the data (preference pairs, ``data.preference``),
the loss module (:class:`~finetune.training.dpo.DpoLoss`, with the same ``(sum, count)`` interface as the
supervised loss, so the loop, evaluation and checkpoints are shared) and the extra figures each step logs.
"""

from __future__ import annotations

import math
import signal
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from transformers import get_scheduler

from .. import atomic
from ..config import BASE_CHANGING_INITS, Config, config_from_dict
from ..data.batching import (
    PACK_MULTIPLE,
    PAD_GROUP_CALL_COST_CPU,
    Window,
    collate_packed,
    collate_padded_groups,
    label_count,
    pad_id,
    plan_epoch,
    real_tokens,
)
from ..data.preference import prepare_pairs
from ..data.prepare import Prepared, format_summary, prepare
from ..errors import (
    ConfigError,
    FinetuneError,
    IntegrityError,
    NonFiniteError,
    PackingError,
    RegistryAccessError,
    TrainingCanceled,
    TrainingStalledError,
    UsageError,
    one_line,
)
from ..modeling.load import attach_lora, base_context, load_base_model, load_tokenizer
from ..modeling.ops import rewrite_for_training
from ..modeling.ops.attention import VARLEN_ATTENTION
from ..modeling.ops.loss import CausalLMLoss, normalize_loss
from ..modeling.precision import choose_precision, torch_dtype
from ..names import parse_ref
from ..registry import Registry, TrainingPaths, Version
from ..registry.files import Files
from ..registry.jobs import Status, TrainingRecord, Trainings, check_resumable
from ..registry.manifest import utc_now
from ..registry.sources import ResolvedModel, resolve_model
from .checkpoint import Progress, checkpoints, load_checkpoint, save_checkpoint
from .dpo import DpoLoss, attach_reference, collate_pairs
from .metrics import MetricsLog, Throughput, peak_memory_mb
from .publishing import save_initial_adapter
from .runlog import RunLog, quiet_libraries, step_line
from .submit import submit_training
from .trackers import RunTrackers


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
    claimed = trainings.get(training_id)
    config = config_from_dict(claimed.input, source=f"training {training_id}")
    destination = claimed.destination
    started_from = claimed.model  # what an earlier start of this run resolved base_model to (every rank reads it)
    record = claimed if state.is_main_process else None  # only the main process writes the record

    precision = choose_precision(config.train.precision, state.device)
    # Accelerator settings live in a process-wide singleton that refuses another precision: a second run in the
    # same process (a notebook, a test suite) would fail. Our training state is ours, so each run starts the
    # singleton afresh; PartialState, which holds the process group, stays.
    AcceleratorState._reset_state()
    paths = trainings.paths(training_id)
    # Trackers go to the Accelerator as it is made; only the main process reports (and probes W&B's host).
    trackers = RunTrackers(config.train.report_to if state.is_main_process else [], training_id, destination,
                           paths.trackers, reg.trackers_dir())
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                              cpu=state.device.type == "cpu", log_with=trackers.trackers or None)

    log = RunLog(paths.log if state.is_main_process else None, echo=progress)
    stop = _StopFlag(trainings, training_id)
    succeeded = False
    try:
        version = _train(_Run(training_id, destination, config, reg, trainings, paths, record, accelerator,
                              precision, log, stop, show_progress=progress, started_from=started_from,
                              trackers=trackers))
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
        trackers.finish(accelerator, succeeded)
        stop.restore()
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


@dataclass
class _Run:
    """What every stage of one run needs: set up once by :func:`run_training`, then read by the stages."""

    training_id: str
    destination: str
    config: Config
    registry: Registry
    trainings: Trainings
    paths: TrainingPaths
    record: TrainingRecord | None  # the main process's; the others never write it
    accelerator: Accelerator
    precision: str
    log: RunLog
    stop: _StopFlag
    show_progress: bool
    trackers: RunTrackers
    started_from: str = ""  # the record's model: what an earlier start of this run resolved base_model to

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def update_record(self, **changes: Any) -> None:
        if self.record is not None:
            self.trainings.update(self.record, **changes)


@dataclass
class _Loaded:
    """The model and the data of a run, loaded."""

    resolved: ResolvedModel
    tokenizer: Any
    prepared: Prepared
    label_counts: list[int]  # label tokens per training row: windows are planned from these
    lengths: list[int]  # tokens per training row: the largest step goes first
    model: Any  # the PEFT model: the trainable adapter on the frozen base
    trainable: list[torch.nn.Parameter]
    packing: bool  # packed rows, or padded batches (``train.packing``, and with ``auto`` what the model allows)
    reference: str | None = None  # dpo from an adapter version: the frozen copy of it (training.dpo)


@dataclass
class _Schedule:
    """The optimizer steps to take, and what takes them."""

    steps_per_epoch: int
    total_steps: int
    loss_model: Any  # CausalLMLoss around the model, prepared by accelerate
    model: Any  # the PEFT model inside it (what checkpoints save and the run publishes)
    optimizer: Any
    scheduler: Any
    batches: Callable[[list[dict[str, Any]]], list[dict[str, torch.Tensor]]]  # a micro-batch's model inputs
    # figures the loss module gathered since the last call (dpo's rewards; nothing for sft), over all processes
    take_stats: Callable[[], dict[str, float]] = dict


def _plan(run: _Run, loaded: _Loaded, epoch: int) -> list[Window]:
    """The optimizer steps of one epoch; the same on every process and every resume."""
    tcfg = run.config.train
    return plan_epoch(loaded.label_counts, loaded.lengths, tcfg.batch_size, tcfg.grad_accum, run.world, tcfg.seed,
                      epoch, packed=loaded.packing)


# The version's train_loss is the mean over this many last steps: one step's loss is one (often partial) batch's.
TRAIN_LOSS_STEPS = 20


# A run stalls when this many steps in a row have all-zero gradients, or the same loss (relative spread below
# STALL_TOLERANCE) over different data: a model whose answer no longer depends on its input (most often after a
# learning rate far too high saturated it) learns nothing more, and its version would answer nothing.
STALL_STEPS = 5
STALL_TOLERANCE = 1e-5


class _Stall:
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


@dataclass
class _Outcome:
    """What the loop leaves for the summary."""

    last_loss: float | None = None
    last_eval: float | None = None
    tokens_per_s: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=TRAIN_LOSS_STEPS))  # last steps' losses
    trained: bool = False  # whether this process took any step (a resumed finished run takes none)
    stall: _Stall = field(default_factory=_Stall)
    last_stats: dict[str, float] = field(default_factory=dict)  # the last step's dpo rewards (none for sft)

    @property
    def mean_loss(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else self.last_loss


def _train(run: _Run) -> Version | None:
    run.log.info(f"training {run.training_id} -> {run.destination} ({run.world} "
                 f"process{'es' if run.world > 1 else ''}, {run.accelerator.device.type}, {run.precision})")
    check_processes(run.config, run.world)
    loaded = _load(run)
    schedule = _schedule(run, loaded)
    metrics = MetricsLog(run.paths.metrics)
    progress = _resume(run, loaded, schedule, metrics)
    run.trackers.start(run.accelerator, run.config.to_dict(), progress.step)
    for note in run.trackers.notes:
        run.log.info(f"reporting to {note}")
    run.stop.check(run.accelerator)  # a cancel that arrived while loading ends the run before its first step
    run.update_record(status=Status.PROCESSING, started_at=(run.record and run.record.started_at) or utc_now())
    outcome = _loop(run, loaded, schedule, progress, metrics)
    if outcome.trained:
        _check_final_loss(run, loaded, schedule, progress)
    progress.done = True
    if outcome.trained:  # the finished state, so a resume after a failed publish publishes it without retraining
        save_checkpoint(run.paths.checkpoints, progress, schedule.model, schedule.optimizer, schedule.scheduler,
                        run.rank, run.main, run.accelerator.wait_for_everyone)
    return _publish(run, loaded, schedule, progress, outcome, metrics)


def _start_spec(run: _Run) -> str:
    """What the run starts from: ``base_model``, except that a resumed run keeps the registry version its first
    start resolved (``base_model: owner/name`` means the latest version *then*, not one published since)."""
    try:
        if run.started_from and parse_ref(run.started_from).kind == "number":
            return run.started_from
    except UsageError:
        pass  # a hub id or a folder: resolved again, as given
    return run.config.base_model


def _load(run: _Run) -> _Loaded:
    """The base model (with its adapter, when continuing a fine-tune), the tokenizer, the tokenized data."""
    config, tcfg = run.config, run.config.train
    resolved = resolve_model(run.registry, _start_spec(run))
    run.update_record(model=resolved.chain[0].ref if resolved.chain else resolved.base.description)
    tokenizer = load_tokenizer(resolved.base)
    context = base_context(resolved.base, tokenizer)
    if context is not None and config.data.max_seq_len > context:
        raise ConfigError([("data.max_seq_len", f"data.max_seq_len: {config.data.max_seq_len} is more than the "
                           f"{context} positions of base model {resolved.base.description}; set it to {context} or "
                           "less")])
    # Files uploaded to the service (upload:ID) are read from the registry and named as they were uploaded
    files = Files(run.registry)
    data_path, data_name = files.data_file(config.data.path)
    eval_spec, eval_name = files.data_file(config.data.eval) if isinstance(config.data.eval, str) \
        else (config.data.eval, None)
    labels = {p: n for p, n in ((data_path, data_name), (eval_spec, eval_name)) if n is not None}
    dpo = tcfg.method == "dpo"
    if dpo:  # pairs: each counts once in a step's mean (the loss is per pair, not per token)
        prepared = prepare_pairs(data_path, tokenizer, max_seq_len=config.data.max_seq_len,
                                 overlong=config.data.overlong, eval=eval_spec, seed=tcfg.seed, labels=labels)
        label_counts = [1] * len(prepared.train)
    else:
        with run.accelerator.main_process_first():  # one process tokenizes, the others read its cache
            prepared = prepare(
                data_path, config.data.format, tokenizer, max_seq_len=config.data.max_seq_len,
                train_on_inputs=tcfg.train_on_inputs, overlong=config.data.overlong, eval=eval_spec,
                seed=tcfg.seed, cache_dir=str(run.registry.cache_dir("tokenized")), labels=labels,
            )
        label_counts = [label_count(labels) for labels in prepared.train["labels"]]
    run.log.info(format_summary(prepared.info))

    set_seed(tcfg.seed)  # LoRA init and dropout draw from the global generators
    base, packing = _load_base(run, resolved, packing=not dpo)
    adapter_dir = str(resolved.adapter.path) if resolved.adapter else None
    model = attach_lora(base, config.lora, adapter_dir=adapter_dir)
    reference = attach_reference(model, adapter_dir) if dpo else None
    if dpo:
        run.log.info(f"dpo: beta {config.dpo.beta}, loss {config.dpo.loss}, sft_weight {config.dpo.sft_weight}; "
                     f"reference: {'the starting adapter, frozen' if reference else 'the base (adapter off)'}")
    if adapter_dir is None and config.lora.init in BASE_CHANGING_INITS:
        save_initial_adapter(model, run.paths.folder, run.main)
    run.log.info(str(rewrite_for_training(model, run.precision, run.accelerator.device)))  # the fused paths on
    trainable = [p for p in model.parameters() if p.requires_grad]
    run.log.info(f"trainable parameters: {sum(p.numel() for p in trainable):,} "
                 f"of {sum(p.numel() for p in model.parameters()):,}")
    lengths = list(prepared.train["length"])
    return _Loaded(resolved, tokenizer, prepared, label_counts, lengths, model, trainable, packing, reference)


def _load_base(run: _Run, resolved: ResolvedModel, packing: bool = True) -> tuple[Any, bool]:
    """The frozen base, and whether it trains on packed rows: with ``packing: auto``, packed where loading finds
    that the model keeps packed sequences apart, else padded (the log says why); ``true`` insists. ``packing``
    False: padded batches whatever the config says (dpo's pairs)."""
    dtype, wanted = torch_dtype(run.precision), run.config.train.packing if packing else False
    if wanted:
        try:
            return load_base_model(resolved.base, dtype, attn_implementation=VARLEN_ATTENTION), True
        except PackingError as err:
            if wanted is True:
                raise
            run.log.info(f"packing off: {err.message}; training on padded batches")
    return load_base_model(resolved.base, dtype), False


def _schedule(run: _Run, loaded: _Loaded) -> _Schedule:
    """Optimizer steps over epochs of windows; the optimizer, the LR schedule, how micro-batches are collated."""
    tcfg = run.config.train
    steps_per_epoch = len(_plan(run, loaded, 0))
    if steps_per_epoch == 0:
        raise UsageError(f"the training set ({len(loaded.prepared.train)} rows) is too small for {run.world} processes")
    total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    # fused: one kernel for all adapter tensors instead of a dozen small ops per tensor (CPU and CUDA alike).
    optimizer = torch.optim.AdamW(loaded.trainable, lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True)
    scheduler = get_scheduler(tcfg.scheduler if tcfg.scheduler != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=tcfg.warmup_steps, num_training_steps=total_steps)
    dcfg = run.config.dpo
    dpo = DpoLoss(loaded.model, dcfg.beta, dcfg.loss, dcfg.sft_weight, loaded.reference) \
        if tcfg.method == "dpo" else None
    loss_model, optimizer = run.accelerator.prepare(dpo or CausalLMLoss(loaded.model), optimizer)
    pad = pad_id(loaded.tokenizer)
    # Padded micro-batches go in groups of similar lengths on CPUs, where the padding saved outweighs the extra
    # passes; GPUs keep them whole (not measured there).
    group_cost = PAD_GROUP_CALL_COST_CPU if run.accelerator.device.type == "cpu" else None

    def batches(examples: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        if dpo is not None:
            return collate_pairs(examples, pad)
        if loaded.packing:
            return [collate_packed(examples, pad, PACK_MULTIPLE)]
        return collate_padded_groups(examples, pad, group_cost)

    model = run.accelerator.unwrap_model(loss_model).model
    take_stats = (lambda: dpo.take_stats(run.accelerator)) if dpo is not None else dict
    return _Schedule(steps_per_epoch, total_steps, loss_model, model, optimizer, scheduler, batches, take_stats)


def _resume(run: _Run, loaded: _Loaded, schedule: _Schedule, metrics: MetricsLog) -> Progress:
    """Adapter, optimizer, scheduler, RNG and position from the newest intact checkpoint; a fresh start without
    one. A damaged checkpoint is skipped, saying so and naming the one the run falls back to."""
    progress, skipped = None, []
    for ckpt in checkpoints(run.paths.checkpoints):
        try:
            progress = load_checkpoint(ckpt, schedule.model, schedule.optimizer, schedule.scheduler, run.rank)
        except IntegrityError as err:
            skipped.append(err.message)
            continue
        fallback = f" ({'; '.join(skipped)}: skipped)" if skipped else ""
        run.log.info(f"resumed from {ckpt.name} (step {progress.step}){fallback}")
        break
    if progress is None:
        if skipped:
            run.log.info(f"{'; '.join(skipped)}: no intact checkpoint left, starting again from step 0")
        if run.main and metrics.path.exists():
            metrics.path.unlink()
        return Progress()
    if run.main:
        metrics.truncate_after(progress.step)
    run.update_record(resumed_from_step=progress.step)
    return progress


def _loop(run: _Run, loaded: _Loaded, schedule: _Schedule, progress: Progress, metrics: MetricsLog) -> _Outcome:
    """One iteration per optimizer step, until the last step, early stopping, or a stop request."""
    tcfg, accelerator, eval_set = run.config.train, run.accelerator, loaded.prepared.eval
    outcome = _Outcome(stall=_Stall(same_loss=tcfg.method != "dpo"))
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
                plan = (epoch, _plan(run, loaded, epoch))
            window = plan[1][index]
            step_lr = schedule.scheduler.get_last_lr()[0]  # this step's rate; after scheduler.step() it is the next's
            loss_sum, step_tokens, grad_norm = _optimizer_step(run, schedule, loaded, window)
            progress.step += 1
            progress.tokens += step_tokens
            outcome.last_loss = float(accelerator.reduce(loss_sum.detach(), "sum")) / max(window.label_tokens, 1)
            if not math.isfinite(outcome.last_loss):  # every process holds the same reduced loss: all stop here
                raise NonFiniteError(
                    f"the loss became {outcome.last_loss} at step {progress.step} (lr {step_lr:.3g}, {run.precision}): "
                    "the run diverged and publishes nothing",
                    f"lower train.lr (now {tcfg.lr:g}), or use train.precision: fp32 if it ran in bf16 or fp16")
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


def _check_final_loss(run: _Run, loaded: _Loaded, schedule: _Schedule, progress: Progress) -> None:
    """The last update is never followed by a step that would show its loss: one forward over the first batch
    tells whether it left the adapter finite (an update with a huge learning rate can overflow it)."""
    train_set, accelerator = loaded.prepared.train, run.accelerator
    examples = [train_set[j] for j in range(min(run.config.train.batch_size, len(train_set)))]
    with torch.no_grad(), accelerator.autocast():
        sums = [schedule.loss_model(**_to_device(batch, accelerator.device)) for batch in schedule.batches(examples)]
    loss = sum(float(loss_sum) for loss_sum, _ in sums) / max(sum(float(count) for _, count in sums), 1.0)
    if not math.isfinite(loss):
        raise NonFiniteError(
            f"the loss became {loss} after the last step ({progress.step}, lr {run.config.train.lr:g}, "
            f"{run.precision}): the run diverged and publishes nothing",
            f"lower train.lr (now {run.config.train.lr:g}), or use train.precision: fp32 if it ran in bf16 or fp16")


def _optimizer_step(run: _Run, schedule: _Schedule, loaded: _Loaded,
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


def _evaluate(run: _Run, schedule: _Schedule, eval_set: Any, progress: Progress) -> float:
    """The eval loss now, counted toward early stopping."""
    loss = evaluate(schedule.loss_model, eval_set, schedule.batches, run.config.train.batch_size, run.accelerator)
    if progress.best_eval is None or loss < progress.best_eval:
        progress.best_eval, progress.bad_evals = loss, 0
    else:
        progress.bad_evals += 1
    return loss


def _publish(run: _Run, loaded: _Loaded, schedule: _Schedule, progress: Progress, outcome: _Outcome,
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
    from .publishing import publish_adapter

    assert run.record is not None
    run.trackers.log_final(accelerator, summary, progress.step)
    version = publish_adapter(
        run.registry, run.trainings, run.record, run.destination, schedule.model, loaded.tokenizer, run.config,
        loaded.resolved, loaded.prepared.info, summary, metrics,
    )
    run.update_record(status=Status.SUCCEEDED, metrics=summary,
                      output={"version": version.ref, "weights": str(version.path)})
    run.log.info(f"published {version.ref} ({version.id[:12]})")
    return version


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


class _StopFlag:
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
