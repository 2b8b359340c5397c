"""The generation loop of an inference worker: batched decoding with a KV cache, streaming, cancel.

Requests for versions of one base are decoded together, one token per row per step, in one forward pass
(each row with its own adapter; see :mod:`finetune.decoding.cache`). A request that arrives while a batch runs
joins it at the next step: its prompt is prefilled on its own, then its KV cache is left-padded to the
batch's length and stacked onto it (rows keep their own attention masks and positions). Finished and
canceled rows leave the batch at once, so a cancel stops generation within a step. A request for another
base waits until the running batch drains (which it does: nothing joins once another base is waiting).
Where there is room for fewer jobs than wait, the accounts take turns (round-robin, oldest job first within an
account): one account queueing many predictions delays another's by one turn at most, not by its whole queue.

A request that fails on its own (its sampling, its seed, its prefill) ends ``failed`` alone; the rest of the
batch goes on. Every job the loop takes ends with exactly one ``done``, whatever fails.

Each request reports through its ``emit(kind, payload)`` callback: ``processing`` (it entered a batch),
``log`` (loading notes), ``output`` (a text piece), and finally ``done`` with its status (succeeded, failed,
canceled), error and metrics.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FinetuneError, one_line
from .batch import Batch, cache_argument
from .cache import BASE_ADAPTER, ModelCache, Servable
from .job import Job, done_metrics, finish_unstarted
from .sampling import sample
from .text import Detokenizer, StopMatcher

__all__ = ["Engine", "Job"]  # Job: the serving layer builds jobs through this module


@dataclass
class _Row:
    job: Job
    servable: Servable
    detok: Detokenizer
    stop: StopMatcher
    generator: torch.Generator | None
    started: float
    first_token: float | None = None
    generated: int = 0
    done: bool = False


class Engine:
    """Runs jobs on a :class:`ModelCache` in one background thread (``start``/``stop``)."""

    def __init__(self, cache: ModelCache, max_batch: int = 32):
        self.cache = cache
        self.max_batch = max_batch
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # forward passes run (a test and the benchmark read how well requests were batched)
        self.max_rows = 0
        self._turns: dict[str, int] = {}  # account -> when it last had a job taken (round-robin between accounts)
        self._tick = 0

    # ------------------------------------------------------------------ control
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="finetune-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.canceled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._pending.append(job)
            self._cond.notify_all()

    def cancel(self, job_id: str) -> bool:
        """Ask a job to stop; a queued job ends before it starts, a running one within a step."""
        with self._cond:
            for job in self._pending:
                if job.id == job_id:
                    job.canceled.set()
                    self._cond.notify_all()
                    return True
        return False  # the caller also sets the job's own event (it holds the job)

    def run_here(self, job: Job) -> None:
        """Run ``job`` to its end in the calling thread, without the background one (``finetune predict`` and the
        Python API: :mod:`finetune.decoding.local`); it reports through its ``emit`` as any job does."""
        self._run_batch([job])

    # ------------------------------------------------------------------ scheduling
    def _take(self, base: str | None, room: int) -> list[Job]:
        """Queued jobs of ``base``, up to ``room``; None: of the base of the job :meth:`_next` picks. The accounts
        take turns: the one whose last turn is oldest goes first (then the one waiting longest), with its oldest
        job."""
        with self._cond:
            if base is None:
                if not self._pending:
                    return []
                base = self._next(self._pending).base
            elif any(job.base != base for job in self._pending):
                return []  # another base waits: let this batch drain
            waiting = [job for job in self._pending if job.base == base]
            taken: list[Job] = []
            while waiting and len(taken) < room:
                job = self._next(waiting)
                self._tick += 1
                self._turns[job.owner] = self._tick
                waiting.remove(job)
                taken.append(job)
            for job in taken:
                self._pending.remove(job)
            if len(self._turns) > 4096:  # accounts long gone: forget their turns
                self._turns = dict(sorted(self._turns.items(), key=lambda kv: kv[1])[-1024:])
            return taken

    def _next(self, jobs: list[Job]) -> Job:
        """Whose turn it is among ``jobs`` (oldest first): the oldest job of the account served longest ago."""
        first: dict[str, Job] = {}
        for job in jobs:
            first.setdefault(job.owner, job)
        return first[min(first, key=lambda owner: self._turns.get(owner, -1))]  # ties: oldest job first

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for job in self._pending:
                        finish_unstarted(job, "canceled", "the inference worker stopped")
                    self._pending.clear()
                    return
            jobs = self._take(None, self.max_batch)
            if jobs:
                try:
                    self._run_batch(jobs)
                except Exception as err:  # a bug must not kill the worker; the jobs say what happened
                    traceback.print_exc()
                    for job in jobs:
                        if not job.ended:
                            finish_unstarted(job, "failed", f"internal error: {one_line(err)}")

    # ------------------------------------------------------------------ one batch
    def _admit(self, jobs: list[Job]) -> list[_Row]:
        """Servables for jobs (loading what is missing); failed or canceled jobs are settled here, each alone."""
        rows = []
        for job in jobs:
            if job.canceled.is_set():
                finish_unstarted(job, "canceled", None)
                continue
            started = time.perf_counter()
            job.emit("processing", {})
            try:
                servable, loaded = self.cache.acquire(job.ref, log=lambda text, j=job: j.emit("log", {"text": text}))
            except FinetuneError as err:
                finish_unstarted(job, "failed", str(err))
                continue
            except Exception as err:
                finish_unstarted(job, "failed", f"cannot load {job.ref}: {one_line(err)}")
                continue
            try:
                if not loaded:
                    job.emit("log", {"text": f"{job.ref} was already loaded in this worker (no reload)"})
                for note in job.notes:
                    job.emit("log", {"text": note})
                settings = job.settings
                generator = None
                if settings.temperature > 0:
                    generator = torch.Generator(device=servable.base.device)
                    seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(7), "little")
                    generator.manual_seed(seed)
                rows.append(_Row(job, servable, Detokenizer(servable.loaded.tokenizer),
                                 StopMatcher(settings.stop_sequences), generator, started))
            except Exception as err:  # this job's settings (its seed): it fails, the others go on
                traceback.print_exc()
                self.cache.release(servable)
                finish_unstarted(job, "failed", f"cannot start generating: {one_line(err)}")
        return rows

    @torch.inference_mode()
    def _run_batch(self, jobs: list[Job]) -> None:
        taken = list(jobs)  # every job this batch took: each ends with one "done", whatever fails
        admitted: list[_Row] = []  # every row this batch ever held: all end through _finish, even on errors
        try:
            rows = self._admit(jobs)
            admitted += rows
            if not rows:
                return
            base = rows[0].servable.base  # pinned versions keep their base in memory: one object all batch long
            batch = self._prefill_alone(base, rows)
            while True:
                batch = self._drop_finished(batch) if batch is not None else None
                room = self.max_batch - (len(batch.rows) if batch is not None else 0)
                arrivals = self._take(base.key, room) if room > 0 else []
                taken += arrivals
                newcomers = self._admit(arrivals)
                admitted += newcomers
                if newcomers:
                    fresh = self._prefill_alone(base, newcomers)
                    if fresh is not None:
                        batch = fresh if batch is None else batch.join(fresh)
                    continue  # the newcomers' first tokens are in: check for finished rows again
                if arrivals:
                    continue  # they all ended at once (canceled, failed to load): look for more
                if batch is None:
                    return
                self._step(base, batch)
        except Exception as err:  # the batch's own forward pass: every row in it fails
            traceback.print_exc()
            for row in admitted:
                if not row.done:
                    self._finish(row, "failed", f"generation failed: {one_line(err)}")
        finally:
            for job in taken:
                if not job.ended:  # never left processing for ever, whatever failed above
                    finish_unstarted(job, "failed", "internal error: the inference worker lost the prediction")

    def _prefill_alone(self, base: Any, rows: list[_Row]) -> Batch | None:
        """Prefill ``rows``; if that fails, they fail (and only they: a running batch they were to join goes on)."""
        try:
            return self._prefill(base, rows)
        except Exception as err:
            traceback.print_exc()
            for row in rows:
                self._finish(row, "failed", f"generation failed: {one_line(err)}")
            return None

    def _forward(self, base: Any, rows: list[_Row], input_ids: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor, cache: Any) -> torch.Tensor:
        model = base.model
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      logits_to_keep=1)
        kwargs[cache_argument(base)] = cache
        names = [row.servable.adapter for row in rows]
        self.steps += 1
        self.max_rows = max(self.max_rows, len(rows))
        if not base.peft:
            return model(**kwargs).logits[:, -1, :]
        if base.merged is not None:  # the base's only version, merged in place: a plain forward
            if any(name != base.merged for name in names):
                raise RuntimeError(f"rows for {sorted(set(names))} on a base merged with {base.merged}")
            return model.get_base_model()(**kwargs).logits[:, -1, :]
        if len(set(names)) == 1:
            if names[0] == BASE_ADAPTER:
                base.active.name = None
                with model.disable_adapter():
                    return model(**kwargs).logits[:, -1, :]
            if model.active_adapter != names[0]:
                model.set_adapter(names[0])  # for layers the lean forward leaves to PEFT
            base.active.name = names[0]
            # The adapter layers live inside the base model (PEFT injects them): calling it directly skips the
            # PeftModel wrapper's per-call work, which only mixed batches need.
            return model.get_base_model()(**kwargs).logits[:, -1, :]
        return model(**kwargs, adapter_names=names).logits[:, -1, :]  # PEFT routes each row to its adapter

    def _prefill(self, base: Any, rows: list[_Row]) -> Batch:
        from transformers import DynamicCache

        device = base.device
        width = max(len(row.job.ids) for row in rows)
        pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's next token goes in the last column
            n = len(row.job.ids)
            ids[i, width - n:] = torch.tensor(row.job.ids, dtype=torch.long)
            mask[i, width - n:] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(base, rows, ids, mask, positions, cache)
        batch = Batch(rows, cache, mask, positions[:, -1] + 1)
        self._consume(batch, logits)
        return batch

    def _step(self, base: Any, batch: Batch) -> None:
        ones = torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        logits = self._forward(base, batch.rows, batch.last[:, None], batch.mask, batch.next_pos[:, None],
                               batch.cache)
        batch.next_pos = batch.next_pos + 1
        self._consume(batch, logits)

    def _consume(self, batch: Batch, logits: torch.Tensor) -> None:
        """Pick each row's next token, stream its text, and mark rows that are done. A row whose sampling or
        text fails ends ``failed`` alone (it leaves the batch at the next step); the others go on."""
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(batch.rows):
            if row.job.settings.temperature > 0 and not row.done:
                try:
                    tokens[i] = sample(logits[i].float(), row.job.settings, row.generator)
                except Exception as err:
                    self._fail_row(row, err)
        batch.last = tokens
        now = time.perf_counter()
        for row, token in zip(batch.rows, tokens.tolist()):
            if row.done:
                continue
            try:
                self._advance(row, token, now)
            except Exception as err:
                self._fail_row(row, err)

    def _fail_row(self, row: _Row, err: Exception) -> None:
        traceback.print_exc()
        self._finish(row, "failed", f"generation failed: {one_line(err)}")

    def _advance(self, row: _Row, token: int, now: float) -> None:
        """One new token for one row: stream its text, or end the row."""
        if row.job.canceled.is_set():
            self._finish(row, "canceled", None)
            return
        if row.first_token is None:
            row.first_token = now
        if token in row.servable.eos:
            self._finish(row, "succeeded", None)
            return
        row.generated += 1
        row.job.output_ids.append(token)
        self._emit_text(row, row.stop.feed(row.detok.add(token)))
        if row.stop.stopped:
            self._finish(row, "succeeded", None)
        elif row.generated >= row.job.max_new_tokens:
            self._finish(row, "succeeded", None)

    def _drop_finished(self, batch: Batch) -> Batch | None:
        for row in batch.rows:  # canceled while waiting on the step: stop before computing another token
            if not row.done and row.job.canceled.is_set():
                self._finish(row, "canceled", None)
        keep = [i for i, row in enumerate(batch.rows) if not row.done]
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            batch.select(keep)
        return batch

    @staticmethod
    def _emit_text(row: _Row, text: str) -> None:
        if text:
            row.job.emit("output", {"text": text})

    def _finish(self, row: _Row, status: str, error: str | None) -> None:
        if row.done:
            return
        row.done = True
        self.cache.release(row.servable)  # now, not when the batch ends: the cache may evict it from here on
        if status == "succeeded" and not row.stop.stopped:
            self._emit_text(row, row.stop.feed(row.detok.flush()))
            self._emit_text(row, row.stop.finish())
        metrics = done_metrics(row.job, row.generated, row.started, row.first_token, time.perf_counter())
        row.job.ended = True
        row.job.emit("done", {"status": status, "error": error, "metrics": metrics})
