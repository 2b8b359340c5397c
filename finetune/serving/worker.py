"""Inference workers: the process that holds the models, and the handle the server talks to it through.

The server process never imports torch for predictions: it sends each prediction to a worker process
(``submit``), which renders and tokenizes the prompt exactly as the version was trained
(:func:`finetune.inference.prompt_ids`), checks it against the model's context, answers ``admitted`` (with the
token count) or ``rejected`` (with the HTTP status and the reason) at once, and then runs it in its
:class:`~finetune.serving.engine.Engine`. Everything the job reports (``processing``, ``log``, ``output``,
``done``) comes back as events on a queue, read by a thread of the handle and passed to ``on_event``.

:class:`LocalWorker` runs the same core in the calling process (the benchmark and engine tests use it);
:class:`WorkerProcess` runs it in a child process (what ``finetune serve`` uses). A worker that dies fails its
in-flight predictions with the reason, and the next submit starts a fresh one.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import FinetuneError, UsageError, one_line

OnEvent = Callable[[str, str, dict[str, Any]], None]  # (prediction id, kind, payload)


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs: the registry, the device, the cache's memory budget, the batch size."""

    registry_root: str
    device: str = "auto"
    precision: str = "auto"
    memory_budget_mb: float | None = None  # the cache's budget for model weights; None: no limit
    max_batch: int = 32
    threads: int | None = None  # torch CPU threads in the worker; None: torch's default

    @property
    def budget_bytes(self) -> int | None:
        return None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)


class _Prompts:
    """Renders and tokenizes prompts per version with the version's own tokenizer settings; checks the context.

    It holds its own tokenizers (not the engine's), so admitting a request never waits for a running batch.
    """

    def __init__(self, registry: Any):
        self.registry = registry
        self._versions: dict[str, tuple[Any, int, str]] = {}  # version id -> (LoadedVersion, context, base key)

    def _entry(self, ref: str) -> tuple[Any, int, str]:
        from ..inference import LoadedVersion, prompt_format_of, resolve_device
        from ..modeling.load import load_tokenizer
        from ..registry.sources import resolve_model
        from .cache import base_key

        version = self.registry.resolve(ref)
        entry = self._versions.get(version.id)
        if entry is not None:
            return entry
        resolved = resolve_model(self.registry, version.ref)
        tokenizer = load_tokenizer(resolved.base)
        trained_template = (version.metadata.get("prompt_format") or {}).get("chat_template")
        if trained_template:
            tokenizer.chat_template = trained_template
        context = _context_length(resolved.base, tokenizer)
        loaded = LoadedVersion(version, resolved, None, tokenizer, prompt_format_of(version), resolve_device("cpu"),
                               "fp32")
        entry = (loaded, context, base_key(resolved))
        self._versions[version.id] = entry
        return entry

    def prepare(self, job_id: str, ref: str, data: dict[str, Any], emit: Any) -> Any:
        """A :class:`~finetune.serving.engine.Job` for a checked input, or a FinetuneError saying what is wrong."""
        from ..inference import Prompt, prompt_ids
        from .engine import Job
        from .schema import check_input

        loaded, context, key = self._entry(ref)
        data = check_input(loaded.prompt_format, data)
        prompt = Prompt(data["messages"]) if "messages" in data else Prompt(data["prompt"])
        ids = prompt_ids(loaded, prompt, system=data.get("system_prompt"))
        if len(ids) >= context:
            raise UsageError(f"the prompt is {len(ids)} tokens, but the context of {loaded.version.ref} is {context} "
                             "tokens (prompt and output together)", "shorten the prompt")
        return Job(job_id, loaded.version.ref, key, ids, min(data["max_new_tokens"], context - len(ids)), emit,
                   temperature=data["temperature"], top_p=data["top_p"], top_k=data["top_k"], seed=data.get("seed"),
                   stop_sequences=data["stop_sequences"])


def _context_length(base: Any, tokenizer: Any) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.load_path, revision=base.revision)
    except (OSError, ValueError):
        config = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


class _Core:
    """What a worker does with each message; the same in a child process and in-process."""

    def __init__(self, config: WorkerConfig, send: OnEvent):
        import torch

        from ..registry import Registry
        from .cache import ModelCache
        from .engine import Engine

        if config.threads:
            torch.set_num_threads(config.threads)
        self.send = send
        self.registry = Registry(config.registry_root)
        self.cache = ModelCache(self.registry, device=config.device, precision=config.precision,
                                budget_bytes=config.budget_bytes)
        self.engine = Engine(self.cache, max_batch=config.max_batch).start()
        self.prompts = _Prompts(self.registry)
        self.jobs: dict[str, Any] = {}
        self._lock = threading.Lock()

    def submit(self, job_id: str, ref: str, data: dict[str, Any]) -> None:
        def emit(kind: str, payload: dict[str, Any]) -> None:
            if kind == "done":
                with self._lock:
                    self.jobs.pop(job_id, None)
            self.send(job_id, kind, payload)

        try:
            job = self.prompts.prepare(job_id, ref, data, emit)
        except FinetuneError as err:
            self.send(job_id, "rejected", {"status": getattr(err, "http_status", 422), "detail": str(err),
                                           "type": type(err).__name__})
            return
        except Exception as err:  # a tokenizer or template failing on this input: the input cannot be used
            traceback.print_exc()
            self.send(job_id, "rejected", {"status": 422, "detail": f"cannot prepare the prompt: {one_line(err)}",
                                           "type": type(err).__name__})
            return
        with self._lock:
            self.jobs[job_id] = job
        self.send(job_id, "admitted", {"input_token_count": len(job.ids), "max_new_tokens": job.max_new_tokens,
                                       "version": job.ref})
        self.engine.submit(job)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            job = self.jobs.get(job_id)
        if job is not None:
            job.canceled.set()
            self.engine.cancel(job_id)

    def stats(self) -> dict[str, Any]:
        return {**self.cache.stats(), "steps": self.engine.steps, "max_rows": self.engine.max_rows,
                "pid": os.getpid()}

    def stop(self) -> None:
        self.engine.stop()


class LocalWorker:
    """A worker in this process (threads): same behaviour as :class:`WorkerProcess`, no IPC."""

    def __init__(self, config: WorkerConfig, on_event: OnEvent):
        self.core = _Core(config, on_event)

    def submit(self, job_id: str, ref: str, data: dict[str, Any]) -> None:
        self.core.submit(job_id, ref, data)

    def cancel(self, job_id: str) -> None:
        self.core.cancel(job_id)

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.core.stats()

    def close(self) -> None:
        self.core.stop()


def _child_main(config: WorkerConfig, requests: Any, events: Any) -> None:
    """The worker process: read messages until told to stop (or the parent goes away)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..training.runlog import quiet_libraries

    quiet_libraries()
    core = _Core(config, lambda job_id, kind, payload: events.put((job_id, kind, payload)))
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
        elif op == "stats":
            events.put((message[1], "stats", core.stats()))
        elif op == "stop":
            break
    core.stop()


class WorkerProcess:
    """A worker in a child process (spawned: no CUDA state or locks inherited from the server)."""

    def __init__(self, config: WorkerConfig, on_event: OnEvent, start_timeout: float = 300.0):
        self.config = config
        self.on_event = on_event
        self.start_timeout = start_timeout
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._process: Any = None
        self._requests: Any = None
        self._in_flight: set[str] = set()
        self._replies: dict[str, Any] = {}
        self._closed = False

    def _ensure(self) -> None:
        with self._lock:
            if self._process is not None and self._process.is_alive():
                return
            requests, events = self._ctx.Queue(), self._ctx.Queue()
            process = self._ctx.Process(target=_child_main, args=(self.config, requests, events),
                                        name="finetune-inference", daemon=True)
            process.start()
            ready = threading.Event()
            threading.Thread(target=self._read, args=(process, events, ready), name="finetune-worker-events",
                             daemon=True).start()
            if not ready.wait(self.start_timeout):
                process.kill()
                raise RuntimeError("the inference worker did not start")
            self._process, self._requests = process, requests

    def _read(self, process: Any, events: Any, ready: threading.Event) -> None:
        while True:
            try:
                job_id, kind, payload = events.get(timeout=0.5)
            except queue.Empty:
                if not process.is_alive():
                    self._died(process)
                    return
                continue
            except (EOFError, OSError):
                self._died(process)
                return
            if kind == "ready":
                ready.set()
                continue
            if kind == "stats":
                reply = self._replies.get(job_id)
                if reply is not None:
                    reply[1] = payload
                    reply[0].set()
                continue
            if kind in ("done", "rejected"):
                self._in_flight.discard(job_id)
            try:
                self.on_event(job_id, kind, payload)
            except Exception:
                traceback.print_exc()

    def _died(self, process: Any) -> None:
        if self._closed:
            return
        code = process.exitcode
        for job_id in list(self._in_flight):
            self._in_flight.discard(job_id)
            self.on_event(job_id, "done", {"status": "failed", "metrics": {},
                                           "error": f"the inference worker exited (code {code}) during the prediction"})

    def submit(self, job_id: str, ref: str, data: dict[str, Any]) -> None:
        self._ensure()
        self._in_flight.add(job_id)
        self._requests.put(("submit", job_id, ref, data))

    def cancel(self, job_id: str) -> None:
        if self._requests is not None and job_id in self._in_flight:
            self._requests.put(("cancel", job_id))

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """The worker's cache accounting and batching counters."""
        self._ensure()
        token = os.urandom(8).hex()
        reply: list[Any] = [threading.Event(), None]
        self._replies[token] = reply
        try:
            self._requests.put(("stats", token))
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
