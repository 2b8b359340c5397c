"""Inference workers: the process that holds the models, and the handle the server talks to it through.

The server process never imports torch for predictions: it sends each prediction to a worker process
(``submit``), which renders and tokenizes the prompt exactly as the version was trained
(:func:`finetune.inference.prompt_ids`), checks it against the model's context (and the server's token limit),
answers ``admitted`` (with the token count) or ``rejected`` (with the HTTP status and the reason), and then runs
it in its :class:`~finetune.decoding.engine.Engine`. Everything the job reports (``processing``, ``log``,
``output``, ``done``) comes back as an event, read by the handle's reader thread (:class:`finetune.supervisor.Child`)
and passed to ``on_event``.

Prompts are prepared on threads of their own, never on the thread that reads the worker's messages nor on the
engine's: a long prompt takes seconds to tokenize (the tokenizer releases the GIL meanwhile), and nobody else's
prediction, nor a cancel, waits for it. Short prompts have their own lane, so long ones never queue them.

The worker also runs the web app's comparisons (``compare``: :func:`finetune.compare.compare_versions`), one at a
time on a thread of their own, so that no model is ever loaded in the server process.

:class:`LocalWorker` runs the same core (:class:`WorkerCore`) in the calling process (the benchmark and engine
tests use it); :class:`WorkerProcess` runs it in a child process (what ``finetune serve`` uses);
:class:`finetune.cluster.inference_actor.InferenceActor` runs it in a Ray actor (``--predict-executor ray``). A worker
process that dies is noticed within :data:`DEATH_POLL_S`: its in-flight predictions end at once with the reason
(``done`` with ``died``), and the next submit starts a fresh one.
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import FinetuneError, one_line
from ..supervisor import DEATH_POLL_S, Child, describe_exit
from .prompts import Prompts

OnEvent = Callable[[str, str, dict[str, Any]], None]  # (prediction id, kind, payload)
__all__ = ["DEATH_POLL_S", "CoreCalls", "LocalWorker", "OnEvent", "WorkerConfig", "WorkerCore", "WorkerProcess"]
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
    (:class:`finetune.cluster.inference_actor.InferenceActor`): only how messages and events travel differs."""

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


class CoreCalls:
    """``submit``, ``cancel`` and ``compare`` handed as they are to ``self.core``, a :class:`WorkerCore` in this
    process: :class:`LocalWorker`'s and :class:`finetune.cluster.inference_actor.InferenceActor`'s (whose events
    travel differently; the calls do not)."""

    core: WorkerCore

    def submit(self, job_id: str, ref: str, data: dict[str, Any], owner: str = "") -> None:
        self.core.submit(job_id, ref, data, owner)

    def cancel(self, job_id: str) -> None:
        self.core.cancel(job_id)

    def compare(self, job_id: str, spec: dict[str, Any]) -> None:
        self.core.compare(job_id, spec)


class LocalWorker(CoreCalls):
    """A worker in this process (threads): same behaviour as :class:`WorkerProcess`, no IPC."""

    def __init__(self, config: WorkerConfig, on_event: OnEvent):
        self.core = WorkerCore(config, on_event)

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.core.stats()

    def close(self) -> None:
        self.core.stop()


def main(argv: list[str] | None = None) -> int:
    """The worker process (``python -m finetune.serving.worker CONFIG_JSON``): messages in, events out through
    its :class:`~finetune.supervisor.Channel`, until told to stop or its input ends (the server is gone)."""
    import json
    import sys

    from ..supervisor import Channel

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    channel = Channel.open()  # before the libraries' imports: their prints go to stderr
    config = WorkerConfig(**json.loads((argv if argv is not None else sys.argv[1:])[0]))
    from ..training.runlog import quiet_libraries

    quiet_libraries()
    core = WorkerCore(config, lambda job_id, kind, payload: channel.send(kind, job=job_id, payload=payload))
    channel.send("ready", job="", payload={"pid": os.getpid()})
    for message in channel.messages():
        op = message.get("op")
        if op == "submit":
            core.submit(message["id"], message["ref"], message["data"], message.get("owner", ""))
        elif op == "cancel":
            core.cancel(message["id"])
        elif op == "compare":
            core.compare(message["id"], message["spec"])
        elif op == "stats":
            channel.send("stats", job=message["id"], payload=core.stats())
        elif op == "stop":
            break
    core.stop()
    return 0


class WorkerProcess:
    """A worker in a child process (a :class:`~finetune.supervisor.Child`: a fresh interpreter, so no CUDA state
    or locks are inherited from the server).

    Nothing here waits for the child to start: messages queue in its input pipe until it reads them, so a request
    never holds a server thread while a worker starts (only :meth:`stats` waits, for its answer). Each request is
    tracked with the process it went to, so the death of one process fails exactly its own requests.
    """

    def __init__(self, config: WorkerConfig, on_event: OnEvent):
        self.config = config
        self.on_event = on_event
        self._lock = threading.Lock()
        self._child: Child | None = None
        self._in_flight: dict[str, Child] = {}  # request id -> the process it was sent to
        self._replies: dict[str, list[Any]] = {}
        self._closed = False

    def _ensure(self) -> Child:
        """The running process, starting a fresh one if there is none (without waiting)."""
        import dataclasses
        import json
        import sys

        with self._lock:
            if self._child is None or not self._child.alive():
                child = Child([sys.executable, "-m", "finetune.serving.worker",
                               json.dumps(dataclasses.asdict(self.config))], name="inference")
                child.on_event = lambda event: self._event(event)
                child.on_exit = lambda code: self._died(child, code)
                self._child = child.start()
            return self._child

    def _event(self, event: dict[str, Any]) -> None:
        job_id, kind, payload = event.get("job", ""), event.get("kind"), event.get("payload") or {}
        if kind == "ready" or not job_id:  # not about a request (a library's notice through the channel)
            return
        if kind == "stats":
            reply = self._replies.get(job_id)
            if reply is not None:
                reply[1] = payload
                reply[0].set()
            return
        if kind in ("done", "rejected", "compared"):
            with self._lock:
                self._in_flight.pop(job_id, None)
        try:
            self.on_event(job_id, kind, payload)
        except Exception:
            traceback.print_exc()

    def _died(self, child: Child, code: int) -> None:
        if self._closed:
            return
        with self._lock:
            lost = [job_id for job_id, c in self._in_flight.items() if c is child]
            for job_id in lost:
                del self._in_flight[job_id]
        for job_id in lost:
            try:
                self.on_event(job_id, "done", {"status": "failed", "metrics": {}, "died": True,
                                               "error": f"the inference worker {describe_exit(code)} during the "
                                                        f"prediction"})
            except Exception:
                traceback.print_exc()

    def _send(self, job_id: str, message: dict[str, Any]) -> None:
        child = self._ensure()
        with self._lock:
            self._in_flight[job_id] = child
        child.send(message)
        if not child.alive():  # it died just now, perhaps before its reader counted this request
            child.wait(5.0)
            self._died(child, child.poll() if child.poll() is not None else -9)

    def submit(self, job_id: str, ref: str, data: dict[str, Any], owner: str = "") -> None:
        self._send(job_id, {"op": "submit", "id": job_id, "ref": ref, "data": data, "owner": owner})

    def compare(self, job_id: str, spec: dict[str, Any]) -> None:
        self._send(job_id, {"op": "compare", "id": job_id, "spec": spec})

    def cancel(self, job_id: str) -> None:
        with self._lock:
            child = self._in_flight.get(job_id)
        if child is not None and child is self._child:
            child.send({"op": "cancel", "id": job_id})

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """The worker's cache accounting and batching counters."""
        child = self._ensure()
        token = os.urandom(8).hex()
        reply: list[Any] = [threading.Event(), None]
        self._replies[token] = reply
        try:
            child.send({"op": "stats", "id": token})
            if not reply[0].wait(timeout):
                raise TimeoutError("the inference worker did not answer")
            return reply[1]
        finally:
            self._replies.pop(token, None)

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        child = self._child
        if child is None:
            return
        child.send({"op": "stop"})
        child.close_input()
        if child.wait(timeout) is None:
            child.stop(0)


if __name__ == "__main__":
    raise SystemExit(main())
