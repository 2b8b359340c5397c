"""Comparisons of versions for the web app's Compare tab, run by the inference workers, bounded.

A comparison that answers prompts or scores an eval file loads every compared version, which must never happen in
the server process nor without limit. :class:`Comparisons` checks the bounds (versions, prompts, their length, the
eval file's size; the worker bounds its rows), lets each account run one comparison at a time and the server
:data:`MAX_RUNNING` at once (429 beyond, naming the limit), and hands the work to the inference worker of the
first version's base, which runs :func:`finetune.compare.compare_versions` on a thread of its own. The result (the
comparison as :meth:`~finetune.compare.Comparison.to_dict` gives it) is kept in memory for the account's result
page: the last :data:`MAX_KEPT` comparisons.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LimitError, NotFoundError, UsageError
from ..registry import Version
from .signals import Signal

MAX_VERSIONS = 4
MAX_PROMPTS = 5
MAX_PROMPT_CHARS = 2000
MAX_EVAL_BYTES = 8 << 20
MAX_EVAL_ROWS = 2000
MAX_RUNNING = 2  # comparisons at once on the whole server
MAX_KEPT = 64


@dataclass
class ComparisonJob:
    """One comparison: who asked, what, and once it ended its result or its error (with an HTTP status)."""

    id: str
    owner: str
    model: str
    refs: list[str]
    form: dict[str, Any] = field(default_factory=dict)  # what the caller shows again with the result
    status: str = "running"  # running, succeeded, failed
    result: dict[str, Any] | None = None
    error: str | None = None
    error_status: int = 500
    done: int = 0  # versions compared so far; ``result`` holds their part while the job runs
    created: float = field(default_factory=time.time)
    finished: Signal = field(default_factory=Signal)


class ComparisonNotFoundError(NotFoundError):
    """No comparison of that id (for this account)."""


class Comparisons:
    """The comparisons of one server; ``worker_for(version)`` is the inference worker that serves a version."""

    def __init__(self, worker_for: Callable[[Version], Any], max_running: int = MAX_RUNNING):
        self.worker_for = worker_for
        self.max_running = max_running
        self._jobs: OrderedDict[str, ComparisonJob] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, owner: str, model: str, versions: list[Version], prompts: list[str],
              eval_file: str | None = None, form: dict[str, Any] | None = None) -> ComparisonJob:
        """Check the bounds and hand the comparison to a worker; the job (running)."""
        if not 2 <= len(versions) <= MAX_VERSIONS:
            raise UsageError(f"choose 2 to {MAX_VERSIONS} versions to compare, not {len(versions)}")
        if len(prompts) > MAX_PROMPTS:
            raise UsageError(f"prompts: at most {MAX_PROMPTS}, one a line (got {len(prompts)})")
        long = next((p for p in prompts if len(p) > MAX_PROMPT_CHARS), None)
        if long is not None:
            raise UsageError(f"prompts: each at most {MAX_PROMPT_CHARS} characters (one has {len(long)})")
        if eval_file is not None and os.path.getsize(eval_file) > MAX_EVAL_BYTES:
            raise UsageError(f"eval: the file is {os.path.getsize(eval_file):,} bytes; a comparison here scores at "
                             f"most {MAX_EVAL_BYTES >> 20} MiB", "use `finetune versions compare --eval` for more")
        job = ComparisonJob(id="cmp-" + os.urandom(12).hex(), owner=owner, model=model, refs=[v.ref for v in versions],
                            form=dict(form or {}))
        with self._lock:
            running = [j for j in self._jobs.values() if j.status == "running"]
            if any(j.owner == owner for j in running):
                raise LimitError("a comparison of yours is still running; each account runs one at a time",
                                           "wait for it to finish")
            if len(running) >= self.max_running:
                raise LimitError(f"the server is running {len(running)} comparisons, the most it runs at "
                                           "once", "try again in a minute")
            self._jobs[job.id] = job
            self._trim()
        spec = {"refs": job.refs, "prompts": [{"prompt": p} for p in prompts], "eval_file": eval_file,
                "max_eval_rows": MAX_EVAL_ROWS}
        try:
            self.worker_for(versions[0]).compare(job.id, spec)
        except Exception as err:
            self._end(job, None, f"cannot reach the inference worker: {err}", 503)
            raise
        return job

    def _trim(self) -> None:
        ended = [k for k, j in self._jobs.items() if j.status != "running"]
        for key in ended[:max(0, len(self._jobs) - MAX_KEPT)]:
            del self._jobs[key]

    def get(self, job_id: str, owner: str) -> ComparisonJob:
        """The comparison, if ``owner`` started it (anyone else's, like an unknown one, is not found)."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.owner != owner:
            raise ComparisonNotFoundError(f"comparison {job_id} not found",
                                          "comparisons are kept for a while after they end; start it again")
        return job

    def owns(self, job_id: str) -> bool:
        """Whether ``job_id`` names one of these comparisons (its worker events come here)."""
        with self._lock:
            return job_id in self._jobs

    def on_event(self, job_id: str, kind: str, payload: dict[str, Any]) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            return
        if kind == "compare_progress":
            with self._lock:
                if job.status == "running":
                    job.done, job.result = int(payload.get("done") or 0), payload.get("result")
        elif kind == "compared":
            if "result" in payload:
                self._end(job, payload["result"], None, 200)
            else:
                self._end(job, None, str(payload.get("detail")), int(payload.get("status") or 500))
        elif kind == "done":  # the worker died with the comparison in hand
            self._end(job, None, str(payload.get("error") or "the inference worker stopped"), 503)

    def _end(self, job: ComparisonJob, result: dict[str, Any] | None, error: str | None, status: int) -> None:
        with self._lock:
            if job.status != "running":
                return
            job.result, job.error, job.error_status = result, error, status
            job.status = "succeeded" if error is None else "failed"
        job.finished.set()
