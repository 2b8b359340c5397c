"""Inference workers: the process that holds the models, and the handle the server talks to it through.

The server process never imports torch for predictions: it sends each prediction to a worker process
(``submit``), which renders and tokenizes the prompt exactly as the version was trained
(:func:`finetune.inference.prompt_ids`), checks it against the model's context (and the server's token limit),
answers ``admitted`` (with the token count) or ``rejected`` (with the HTTP status and the reason), and then runs
it in its :class:`~finetune.decoding.engine.Engine`. Everything the job reports (``processing``, ``log``,
``output``, ``done``) comes back as events on a queue, read by a thread of the handle and passed to ``on_event``.

Prompts are prepared on threads of their own, never on the thread that reads the worker's messages nor on the
engine's: a long prompt takes seconds to tokenize (the tokenizer releases the GIL meanwhile), and nobody else's
prediction, nor a cancel, waits for it. Short prompts have their own lane, so long ones never queue them.

The worker also runs the web app's comparisons (``compare``: :func:`finetune.compare.compare_versions`), one at a
time on a thread of their own, so that no model is ever loaded in the server process.

:class:`LocalWorker` runs the same core (:class:`WorkerCore`) in the calling process (the benchmark and engine
tests use it); :class:`WorkerProcess` runs it in a child process (what ``finetune serve`` uses);
:class:`finetune.cluster.inference.InferenceActor` runs it in a Ray actor (``--predict-executor ray``). A worker
process that dies is noticed within :data:`DEATH_POLL_S`: its in-flight predictions end at once with the reason
(``done`` with ``died``), and the next submit starts a fresh one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import FinetuneError, one_line
from .prompts import Prompts

OnEvent = Callable[[str, str, dict[str, Any]], None]  # (prediction id, kind, payload)
DEATH_POLL_S = 0.2  # how often the handle looks whether its worker process is still alive
SHORT_PROMPT_BYTES = 16 * 1024  # prompts up to this size are prepared in their own lane (milliseconds each)


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs: the registry, the device, the cache's memory budget, the batch size."""

    registry_root: str
    device: str = "auto"
    precision: str = "auto"
    memory_budget_mb: float | None = None  # the cache's budget for model weights; None: no limit
    max_batch: int = 32
    threads: int | None = None  # torch CPU threads in the worker; None: torch's default
    max_prompt_tokens: int | None = None  # the most prompt tokens a prediction may have; None: the model's context

    @property
    def budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)


class WorkerCore:
    """What a worker does with each message; the same in a child process, in-process and in a Ray actor
    (:class:`finetune.cluster.inference.InferenceActor`): only how messages and events travel differs."""

    def __init__(self, config: WorkerConfig, send: OnEvent):
        import torch

        from ..decoding.cache import ModelCache
        from ..decoding.engine import Engine
        from ..registry import Registry

        if config.threads:
            torch.set_num_threads(config.threads)
        self.config = config
        self.send = send
        self.registry = Registry(config.registry_root)
        self.cache = ModelCache(self.registry, device=config.device, precision=config.precision,
                                budget_bytes=config.budget_bytes)
        self.engine = Engine(self.cache, max_batch=config.max_batch).start()
        self.prompts = Prompts(self.registry, config.max_prompt_tokens)
        self.jobs: dict[str, Any] = {}
        self._preparing: set[str] = set()
        self._canceled_early: set[str] = set()
        self._lock = threading.Lock()
        self._short = ThreadPoolExecutor(2, thread_name_prefix="finetune-prepare-short")
        self._long = ThreadPoolExecutor(2, thread_name_prefix="finetune-prepare-long")
        self._compare = ThreadPoolExecutor(1, thread_name_prefix="finetune-compare")

    def submit(self, job_id: str, ref: str, data: dict[str, Any], owner: str = "") -> None:
        """Prepare the prediction on a thread of its lane (never on the caller's: that one reads messages)."""
        from .schema import prompt_bytes

        with self._lock:
            self._preparing.add(job_id)
        try:
            size = prompt_bytes(data) if isinstance(data, dict) else 0
        except (TypeError, AttributeError, KeyError):  # an unchecked input: prepare() says what is wrong
            size = 0
        lane = self._short if size <= SHORT_PROMPT_BYTES else self._long
        lane.submit(self._prepare, job_id, ref, data, owner)

    def _prepare(self, job_id: str, ref: str, data: dict[str, Any], owner: str) -> None:
        def emit(kind: str, payload: dict[str, Any]) -> None:
            if kind == "done":
                with self._lock:
                    self.jobs.pop(job_id, None)
            self.send(job_id, kind, payload)

        def reject(status: int, detail: str, err: BaseException) -> None:
            with self._lock:
                self._preparing.discard(job_id)
                self._canceled_early.discard(job_id)
            self.send(job_id, "rejected", {"status": status, "detail": detail, "type": type(err).__name__})

        try:
            job = self.prompts.prepare(job_id, ref, data, emit, owner=owner)
        except FinetuneError as err:
            reject(getattr(err, "http_status", 422), str(err), err)
            return
        except Exception as err:  # a tokenizer or template failing on this input: the input cannot be used
            traceback.print_exc()
            reject(422, f"cannot prepare the prompt: {one_line(err)}", err)
            return
        with self._lock:
            self._preparing.discard(job_id)
            if job_id in self._canceled_early:  # canceled while it was being prepared: it never starts
                self._canceled_early.discard(job_id)
                job.canceled.set()
            self.jobs[job_id] = job
        self.send(job_id, "admitted", {"input_token_count": len(job.ids), "max_new_tokens": job.max_new_tokens,
                                       "version": job.ref})
        self.engine.submit(job)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None and job_id in self._preparing:
                self._canceled_early.add(job_id)
        if job is not None:
            job.canceled.set()
            self.engine.cancel(job_id)

    def compare(self, job_id: str, spec: dict[str, Any]) -> None:
        """Run a comparison (:func:`finetune.compare.compare_versions`) on the compare thread; it reports one
        ``compare_progress`` event after each version (``{"done", "total", "result"}``: the result so far) and one
        ``compared`` event: ``{"result": ...}`` or ``{"status": ..., "detail": ...}``."""
        self._compare.submit(self._run_compare, job_id, spec)

    def _run_compare(self, job_id: str, spec: dict[str, Any]) -> None:
        from ..compare import compare_versions

        def progress(comparison: Any, done: int) -> None:  # the page shows each version's answers as they come
            self.send(job_id, "compare_progress", {"done": done, "total": len(spec["refs"]),
                                                   "result": comparison.to_dict()})

        try:
            result = compare_versions(self.registry, spec["refs"], prompt_records=spec.get("prompts"),
                                      eval_file=spec.get("eval_file"), device=self.config.device,
                                      max_eval_rows=spec.get("max_eval_rows"), on_version=progress)
            payload: dict[str, Any] = {"result": result.to_dict()}
        except FinetuneError as err:
            payload = {"status": getattr(err, "http_status", 422), "detail": str(err)}
        except Exception as err:
            traceback.print_exc()
            payload = {"status": 500, "detail": f"the comparison failed: {one_line(err)}"}
        self.send(job_id, "compared", payload)

    def stats(self) -> dict[str, Any]:
        return {**self.cache.stats(), "steps": self.engine.steps, "max_rows": self.engine.max_rows,
                "pid": os.getpid()}

    def loaded(self) -> list[str]:
        """The refs of the versions loaded now (a router sends their predictions here: no load)."""
        return self.cache.loaded_refs()

    def stop(self) -> None:
        for pool in (self._short, self._long, self._compare):
            pool.shutdown(wait=False, cancel_futures=True)
        self.engine.stop()


class LocalWorker:
    """A worker in this process (threads): same behaviour as :class:`WorkerProcess`, no IPC."""

    def __init__(self, config: WorkerConfig, on_event: OnEvent):
        self.core = WorkerCore(config, on_event)

    def submit(self, job_id: str, ref: str, data: dict[str, Any], owner: str = "") -> None:
        self.core.submit(job_id, ref, data, owner)

    def cancel(self, job_id: str) -> None:
        self.core.cancel(job_id)

    def compare(self, job_id: str, spec: dict[str, Any]) -> None:
        self.core.compare(job_id, spec)

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.core.stats()

    def close(self) -> None:
        self.core.stop()


def _child_main(config: WorkerConfig, requests: Any, events: Any) -> None:
    """The worker process: read messages until told to stop (or the parent goes away)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..training.runlog import quiet_libraries

    quiet_libraries()
    core = WorkerCore(config, lambda job_id, kind, payload: events.put((job_id, kind, payload)))
    events.put(("", "ready", {"pid": os.getpid()}))
    parent = os.getppid()
    while True:
        try:
            message = requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # orphaned: the server is gone
                break
            continue
        op = message[0]
        if op == "submit":
            core.submit(*message[1:])
        elif op == "cancel":
            core.cancel(message[1])
        elif op == "compare":
            core.compare(message[1], message[2])
        elif op == "stats":
            events.put((message[1], "stats", core.stats()))
        elif op == "stop":
            break
    core.stop()


class WorkerProcess:
    """A worker in a child process (spawned: no CUDA state or locks inherited from the server).

    Nothing here waits for the child to start: messages queue until it reads them, so a request never holds a
    server thread while a worker starts (only :meth:`stats` waits, for its answer). Each request is tracked with
    the process it went to, so the death of one process fails exactly its own requests.
    """

    def __init__(self, config: WorkerConfig, on_event: OnEvent):
        self.config = config
        self.on_event = on_event
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._process: Any = None
        self._requests: Any = None
        self._in_flight: dict[str, Any] = {}  # request id -> the process it was sent to
        self._replies: dict[str, Any] = {}
        self._closed = False

    def _ensure(self) -> tuple[Any, Any]:
        """The running process and its request queue, starting a fresh one if there is none (without waiting)."""
        with self._lock:
            if self._process is None or not self._process.is_alive():
                requests, events = self._ctx.Queue(), self._ctx.Queue()
                process = self._ctx.Process(target=_child_main, args=(self.config, requests, events),
                                            name="finetune-inference", daemon=True)
                process.start()
                threading.Thread(target=self._read, args=(process, events), name="finetune-worker-events",
                                 daemon=True).start()
                self._process, self._requests = process, requests
            return self._process, self._requests

    def _read(self, process: Any, events: Any) -> None:
        while True:
            try:
                job_id, kind, payload = events.get(timeout=DEATH_POLL_S)
            except queue.Empty:
                if not process.is_alive():
                    self._died(process)
                    return
                continue
            except (EOFError, OSError):
                self._died(process)
                return
            if kind == "ready":
                continue
            if kind == "stats":
                reply = self._replies.get(job_id)
                if reply is not None:
                    reply[1] = payload
                    reply[0].set()
                continue
            if kind in ("done", "rejected", "compared"):
                with self._lock:
                    self._in_flight.pop(job_id, None)
            try:
                self.on_event(job_id, kind, payload)
            except Exception:
                traceback.print_exc()

    def _died(self, process: Any) -> None:
        if self._closed:
            return
        process.join(1.0)
        code = process.exitcode
        how = f"was killed by signal {-code}" if isinstance(code, int) and code < 0 else f"exited (code {code})"
        with self._lock:
            lost = [job_id for job_id, p in self._in_flight.items() if p is process]
            for job_id in lost:
                del self._in_flight[job_id]
        for job_id in lost:
            try:
                self.on_event(job_id, "done", {"status": "failed", "metrics": {}, "died": True,
                                               "error": f"the inference worker {how} during the prediction"})
            except Exception:
                traceback.print_exc()

    def _send(self, job_id: str, message: tuple) -> None:
        process, requests = self._ensure()
        with self._lock:
            self._in_flight[job_id] = process
        requests.put(message)
        if not process.is_alive():  # it died just now, perhaps before its reader could count this request
            self._died(process)

    def submit(self, job_id: str, ref: str, data: dict[str, Any], owner: str = "") -> None:
        self._send(job_id, ("submit", job_id, ref, data, owner))

    def compare(self, job_id: str, spec: dict[str, Any]) -> None:
        self._send(job_id, ("compare", job_id, spec))

    def cancel(self, job_id: str) -> None:
        with self._lock:
            process = self._in_flight.get(job_id)
        if process is not None and process is self._process and self._requests is not None:
            self._requests.put(("cancel", job_id))

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """The worker's cache accounting and batching counters."""
        _, requests = self._ensure()
        token = os.urandom(8).hex()
        reply: list[Any] = [threading.Event(), None]
        self._replies[token] = reply
        try:
            requests.put(("stats", token))
            if not reply[0].wait(timeout):
                raise TimeoutError("the inference worker did not answer")
            return reply[1]
        finally:
            self._replies.pop(token, None)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        if self._process is None:
            return
        try:
            self._requests.put(("stop",))
        except (OSError, ValueError):
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
