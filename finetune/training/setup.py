"""The setup of a training run, before its first step: its shared state with the Accelerator (:class:`Run`), the
base model resolved and loaded with the tokenized data (:class:`Loaded`), the optimizer steps planned with the
optimizer and LR schedule that take them (:class:`Schedule`), and the position resumed from a checkpoint."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from transformers import get_scheduler

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
)
from ..data.preference import prepare_pairs
from ..data.prepare import Prepared, format_summary, prepare
from ..errors import ConfigError, IntegrityError, PackingError, UsageError
from ..modeling.load import attach_lora, base_context, load_base_model, load_tokenizer
from ..modeling.ops import rewrite_for_training
from ..modeling.ops.attention import VARLEN_ATTENTION
from ..modeling.ops.loss import CausalLMLoss
from ..modeling.precision import choose_precision, torch_dtype
from ..names import parse_ref
from ..registry import Registry, TrainingPaths
from ..registry.files import Files
from ..registry.jobs import TrainingRecord, Trainings
from ..registry.sources import ResolvedModel, resolve_model
from .checkpoint import Progress, checkpoints, load_checkpoint
from .dpo import DpoLoss, attach_reference, collate_pairs
from .guards import StopFlag
from .metrics import MetricsLog
from .publishing import save_initial_adapter
from .runlog import RunLog
from .trackers import RunTrackers


@dataclass
class Run:
    """What every stage of one run needs: set up once by :func:`open_run`, then read by the stages."""

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
    stop: StopFlag
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


def open_run(reg: Registry, trainings: Trainings, training_id: str, state: PartialState, show_progress: bool) -> Run:
    """The run of the claimed record ``training_id``: its config and precision, the Accelerator (with the
    trackers), the log and the stop flag; on every process."""
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

    log = RunLog(paths.log if state.is_main_process else None, echo=show_progress)
    stop = StopFlag(trainings, training_id)
    return Run(training_id, destination, config, reg, trainings, paths, record, accelerator, precision, log, stop,
               show_progress=show_progress, started_from=started_from, trackers=trackers)


@dataclass
class Loaded:
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
class Schedule:
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


def plan_steps(run: Run, loaded: Loaded, epoch: int) -> list[Window]:
    """The optimizer steps of one epoch; the same on every process and every resume."""
    tcfg = run.config.train
    return plan_epoch(loaded.label_counts, loaded.lengths, tcfg.batch_size, tcfg.grad_accum, run.world, tcfg.seed,
                      epoch, packed=loaded.packing)


def _start_spec(run: Run) -> str:
    """What the run starts from: ``base_model``, except that a resumed run keeps the registry version its first
    start resolved (``base_model: owner/name`` means the latest version *then*, not one published since)."""
    try:
        if run.started_from and parse_ref(run.started_from).kind == "number":
            return run.started_from
    except UsageError:
        pass  # a hub id or a folder: resolved again, as given
    return run.config.base_model


def load_run(run: Run) -> Loaded:
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
    base, packing = _load_base(run, resolved)
    adapter_dir = str(resolved.adapter.path) if resolved.adapter else None
    model = attach_lora(base, config.lora, adapter_dir=adapter_dir)
    reference = attach_reference(model, adapter_dir) if dpo else None
    if dpo:
        run.log.info(f"dpo: beta {config.dpo.beta}, loss {config.dpo.loss}, sft_weight {config.dpo.sft_weight}; "
                     f"reference: {'the starting adapter, frozen' if reference else 'the base (adapter off)'}; "
                     f"pairs in {'packed rows' if packing else 'padded batches'}")
    if adapter_dir is None and config.lora.init in BASE_CHANGING_INITS:
        save_initial_adapter(model, run.paths.folder, run.main)
    run.log.info(str(rewrite_for_training(model, run.precision, run.accelerator.device)))  # the fused paths on
    trainable = [p for p in model.parameters() if p.requires_grad]
    run.log.info(f"trainable parameters: {sum(p.numel() for p in trainable):,} "
                 f"of {sum(p.numel() for p in model.parameters()):,}")
    lengths = list(prepared.train["length"])
    return Loaded(resolved, tokenizer, prepared, label_counts, lengths, model, trainable, packing, reference)


def _load_base(run: Run, resolved: ResolvedModel) -> tuple[Any, bool]:
    """The frozen base, and whether it trains on packed rows (supervised rows and dpo's pairs alike): with
    ``packing: auto``, packed where loading finds that the model keeps packed sequences apart, else padded (the
    log says why); ``true`` insists."""
    dtype, wanted = torch_dtype(run.precision), run.config.train.packing
    if wanted:
        try:
            return load_base_model(resolved.base, dtype, attn_implementation=VARLEN_ATTENTION), True
        except PackingError as err:
            if wanted is True:
                raise
            run.log.info(f"packing off: {err.message}; training on padded batches")
    return load_base_model(resolved.base, dtype), False


def build_schedule(run: Run, loaded: Loaded) -> Schedule:
    """Optimizer steps over epochs of windows; the optimizer, the LR schedule, how micro-batches are collated."""
    tcfg = run.config.train
    steps_per_epoch = len(plan_steps(run, loaded, 0))
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
    # A packed row of pairs holds at most what a supervised one can (batch_size rows of max_seq_len tokens), though
    # a micro-batch of pairs has twice the sequences: its activations stay within what supervised steps allow.
    row_tokens = tcfg.batch_size * run.config.data.max_seq_len

    def batches(examples: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        if dpo is not None:
            return collate_pairs(examples, pad, group_cost, packed=loaded.packing, row_tokens=row_tokens)
        if loaded.packing:
            return [collate_packed(examples, pad, PACK_MULTIPLE)]
        return collate_padded_groups(examples, pad, group_cost)

    model = run.accelerator.unwrap_model(loss_model).model
    take_stats = (lambda: dpo.take_stats(run.accelerator)) if dpo is not None else dict
    return Schedule(steps_per_epoch, total_steps, loss_model, model, optimizer, scheduler, batches, take_stats)


def resume(run: Run, loaded: Loaded, schedule: Schedule, metrics: MetricsLog) -> Progress:
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
