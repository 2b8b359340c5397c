"""Inference workers as Ray actors: ``finetune serve --predict-executor ray``.

The worker code is the local one (:class:`~finetune.serving.worker.WorkerCore`: prompts, the model cache, the
batched engine); only the transport differs. On a node, an
:class:`~finetune.cluster.inference_actor.InferenceActor` holds a core and keeps the events it sends
(``admitted``, ``processing``, ``output``, ``done`` ...) numbered in a buffer; the server's
:class:`RayInferencePool` reads them with long polls (``InferenceActor.events``: the events after the last
one it saw, answered as soon as there is one), so a poll that fails for a moment is asked again and loses
nothing. Submit, cancel and compare are plain actor calls.

Routing: each answer also says which versions the actor holds loaded; a prediction goes to an actor that holds
its version (or was sent it last), else to the least loaded one (fewest predictions in flight, then fewest
versions loaded), so versions spread over the actors and stay where they are warm.

A lost actor (its node killed, its process dead): its predictions that had not started decoding go to another
actor (the record says where it runs now, and its logs say that it moved); those already running end
``failed``, naming the node; a new actor replaces it at once (Ray places it on any node with room). Nodes
that cannot see the registry are kept out (:class:`~finetune.cluster.nodes.NodeGate`, as for trainings). The
actors are not detached: they end with the server.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnavailableError, one_line
from ..registry import Registry
from ..serving.worker import OnEvent, WorkerConfig
from .inference_actor import InferenceActor
from .nodes import NodeGate
from .options import PredictOptions
from .session import connect, describe_node, nodes

POLL_S = 10.0  # how long one events() call waits for an event before answering with none
RETRY_S = 0.5
WATCH_S = 5.0  # how often joined nodes are looked for (and probed)
MAX_BACKOFF_S = 60.0  # actors that die before they are ready are replaced at most this slowly
_SETTLED = ("done", "rejected", "compared")


@dataclass
class _Slot:
    """One actor as the server sees it."""

    index: int
    handle: Any
    name: str
    info_ref: Any
    node: dict[str, Any] | None = None  # host, node_id: once the actor answered
    refs: set[str] = field(default_factory=set)  # versions loaded there, or sent there since its last report
    jobs: set[str] = field(default_factory=set)  # ids in flight there
    alive: bool = True


@dataclass
class _Sent:
    """A prediction (or comparison) handed to an actor, kept until it settles so it can move on a loss."""

    job_id: str
    op: str  # "submit" or "compare"
    args: tuple
    ref: str | None
    slot: _Slot | None = None
    admitted: bool = False
    started: bool = False  # it entered a batch: it cannot move any more
    canceled: bool = False


class RayInferencePool:
    """The prediction service's worker (``submit``, ``cancel``, ``compare``, ``stats``, ``close``), over
    ``count`` inference actors in the Ray cluster. Nothing starts before :meth:`_ensure` (the first prediction,
    or the server's prestart)."""

    def __init__(self, config: WorkerConfig, on_event: OnEvent, options: PredictOptions, count: int = 1,
                 say: Callable[[str], None] | None = None):
        self.config, self.on_event, self.options, self.count = config, on_event, options, max(1, count)
        self.say = say or (lambda line: print(line, flush=True))
        self._lock = threading.RLock()
        self._slots: list[_Slot] = []
        self._jobs: dict[str, _Sent] = {}
        self._actor_class: Any = None
        self.gate: Any = None  # NodeGate, once started
        self._gate_lock = threading.Lock()
        self._no_room: str | None = None  # why no usable node can hold an actor (then predictions are refused)
        self._closed = False
        self._failures = 0  # actors in a row that died before they were ready

    # ---------------------------------------------------------------- actors
    def _ensure(self) -> None:
        with self._lock:
            if self._actor_class is not None or self._closed:
                return
            import ray

            how = connect(self.options.address, self.config.registry_root)
            # Nodes that cannot see the registry are kept out, as for trainings (their usable verdicts are the
            # trainings' gate's to print, when trainings run on Ray too).
            self.gate = NodeGate(Registry(self.config.registry_root), what="inference",
                                 say=lambda line: None if line.endswith(": usable") else self.say(f"finetune: {line}"))
            self._refresh(wait_s=30.0)
            self._check_room()
            threading.Thread(target=self._watch, name="ray-inference-nodes", daemon=True).start()
            self._actor_class = ray.remote(InferenceActor)
            self.say(f"finetune: predictions run on {how}: {self.count} inference worker(s) (Ray actors)")
            self._slots = [self._new_slot(i) for i in range(self.count)]

    def _watch(self) -> None:
        """Probe nodes as they join (their verdicts decide where the next actors may go)."""
        while not self._closed:
            time.sleep(WATCH_S)
            try:
                self._refresh()
                self._check_room()
            except Exception:  # the cluster unreachable for a moment: try again at the next look
                pass

    def _refresh(self, wait_s: float = 0.0) -> None:
        with self._gate_lock:  # the watcher and a replacement may both probe
            self.gate.refresh(wait_s=wait_s)

    def _gpus(self) -> float:
        if self.options.gpus is not None:
            return self.options.gpus
        device = self.config.device
        return 1 if device in ("gpu", "cuda") or device.startswith("cuda:") or (
            device == "auto" and any(n.alive and n.resources.get("GPU", 0) > 0 for n in nodes())) else 0

    def _check_room(self) -> None:
        """Note (and say, when it changes) whether any usable node can hold an inference actor: while none can,
        predictions are refused at once (503) instead of waiting for an actor Ray cannot place."""
        need = {k: v for k, v in {"CPU": self.options.cpus, "GPU": self._gpus(), **self.options.resources}.items()
                if v > 0}
        with self._gate_lock:
            usable = self.gate.usable()
        fits = any(all(node.resources.get(k, 0) >= v for k, v in need.items()) for node in usable)
        asked = ", ".join(f"{k} {v:g}" for k, v in need.items()) or "nothing"
        room = None if fits else f"no node of the Ray cluster can hold an inference worker ({asked} each)"
        if room != self._no_room:
            self.say(f"finetune: {room}; predictions are refused until such a node joins" if room else
                     "finetune: a node that can hold inference workers joined")
        self._no_room = room

    def _actor_options(self) -> dict[str, Any]:
        options = {"max_restarts": 0, "max_concurrency": 16, "num_cpus": self.options.cpus, "num_gpus": self._gpus(),
                   "resources": dict(self.options.resources), "scheduling_strategy": "SPREAD"}
        with self._gate_lock:
            refused = self.gate.refused()
        if refused:
            options["label_selector"] = {"ray.io/node-id": f"!in({','.join(refused)})"}
        return options

    def _new_slot(self, index: int) -> _Slot:
        name = f"infer-{index}-{os.urandom(3).hex()}"
        handle = self._actor_class.options(**self._actor_options()).remote(self.config, name)
        slot = _Slot(index, handle, name, handle.info.remote())
        threading.Thread(target=self._read, args=(slot,), name=f"ray-{name}", daemon=True).start()
        return slot

    def _read(self, slot: _Slot) -> None:
        """Wait for the actor to answer, then read its events until it is lost or the pool closes."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        seq = 0
        poll = None
        while not self._closed:
            try:
                if slot.node is None:
                    info = ray.get(slot.info_ref, timeout=POLL_S)
                    slot.node = {"host": info["host"], "node_id": info["node_id"]}
                    self._failures = 0
                    self.say(f"finetune: inference worker {slot.name} ready on {describe_node(info['node_id'], info)}")
                    continue
                poll = poll or slot.handle.events.remote(seq, POLL_S)
                answer = ray.get(poll, timeout=POLL_S + 30)
                poll = None
            except GetTimeoutError:
                continue
            except ActorUnavailableError:  # unreachable for now (its node may be dying): Ray decides soon
                poll = None
                time.sleep(RETRY_S)
                continue
            except RayActorError as err:  # ActorDiedError included: its node or process is gone
                self._lost(slot, err)
                return
            except Exception as err:  # the cluster unreachable for a moment, or the pool closing
                if self._closed:
                    return
                self.say(f"finetune: inference worker {slot.name}: {type(err).__name__}: {one_line(err)}")
                poll = None
                time.sleep(RETRY_S)
                continue
            seq = answer["seq"]
            self._deliver(slot, answer)

    def _deliver(self, slot: _Slot, answer: dict[str, Any]) -> None:
        for job_id, kind, payload in answer["events"]:
            with self._lock:
                sent = self._jobs.get(job_id)
                if sent is None or sent.slot is not slot:
                    continue  # moved elsewhere, or settled here by the server already
                if kind == "admitted":
                    payload = {**payload, "placement": self._placement(slot)}
                    if sent.admitted:  # a moved prediction, admitted again: only where it runs changed
                        kind = "placement"
                    sent.admitted = True
                elif kind in ("processing", "output"):
                    sent.started = True
                elif kind in _SETTLED:
                    self._jobs.pop(job_id, None)
                    slot.jobs.discard(job_id)
            self._emit(job_id, kind, payload)
        if answer["loaded"] is not None:
            with self._lock:
                slot.refs = set(answer["loaded"]) | {s.ref for s in self._jobs.values()
                                                     if s.slot is slot and s.ref}

    def _placement(self, slot: _Slot) -> dict[str, Any]:
        return {"executor": "ray", "actor": slot.name, **(slot.node or {})}

    def _emit(self, job_id: str, kind: str, payload: dict[str, Any]) -> None:
        try:
            self.on_event(job_id, kind, payload)
        except Exception:
            traceback.print_exc()

    def _lost(self, slot: _Slot, err: BaseException) -> None:
        with self._lock:
            if not slot.alive or self._closed:
                return
            slot.alive = False
            mine = [s for s in self._jobs.values() if s.slot is slot]
            running = [s for s in mine if s.started]
            waiting = [s for s in mine if not s.started]
            for sent in running:
                self._jobs.pop(sent.job_id, None)
            where, why = self._where_lost(slot)
            if slot.node is None:
                self._failures += 1
            delay = min(MAX_BACKOFF_S, 2.0 ** self._failures) if self._failures > 1 else 0.0
            self.say(f"finetune: inference worker {slot.name} on {where} lost ({why}): {len(running)} running "
                     f"prediction(s) failed, {len(waiting)} moved to another worker; a new worker starts"
                     + (f" in {delay:.0f} s" if delay else "") + (f"; {one_line(err)}" if slot.node is None else ""))
        for sent in running:
            self._emit(sent.job_id, "done", {"status": "failed", "metrics": {}, "died": True,
                                             "error": f"the inference worker on {where} was lost during the "
                                                      f"prediction ({why})"})
        threading.Thread(target=self._replace, args=(slot, delay), daemon=True).start()
        for sent in waiting:
            if sent.canceled and sent.admitted:
                with self._lock:
                    self._jobs.pop(sent.job_id, None)
                self._emit(sent.job_id, "done", {"status": "canceled", "metrics": {}, "error": None})
                continue
            if sent.admitted:
                self._emit(sent.job_id, "log", {"text": f"its inference worker on {where} was lost ({why}) before "
                                                        f"it started: moved to another worker"})
            try:
                self._dispatch(sent)
            except UnavailableError as gone:
                with self._lock:
                    self._jobs.pop(sent.job_id, None)
                self._emit(sent.job_id, "done", {"status": "failed", "metrics": {}, "died": True, "error": str(gone)})

    def _where_lost(self, slot: _Slot) -> tuple[str, str]:
        if slot.node is None:
            return "no node yet", "it could not start"
        node_id = slot.node["node_id"]
        alive = {n.node_id for n in nodes() if n.alive}
        # Ray ends a node's actors once it declared the node dead: by now the node table says so.
        return describe_node(node_id, slot.node), "its process died" if node_id in alive else "its node was lost"

    def _replace(self, slot: _Slot, delay: float) -> None:
        if delay:
            time.sleep(delay)
        try:
            self._refresh(wait_s=10.0)  # nodes that joined since: probed before the new actor is placed
        except Exception:  # the cluster unreachable for a moment: the verdicts known so far hold
            pass
        with self._lock:
            if self._closed:
                return
            self._slots[slot.index] = self._new_slot(slot.index)
            moved = [s for s in self._jobs.values() if s.slot is slot]  # nowhere else to go at the loss
        for sent in moved:
            self._dispatch(sent)

    # ---------------------------------------------------------------- routing
    def _choose(self, ref: str | None) -> _Slot:
        live = [s for s in self._slots if s.alive]
        if not live:  # every actor lost at once: the first replacement takes it (it is placed by Ray)
            raise UnavailableError("no inference worker is running in the Ray cluster", "retry in a moment")
        warm = [s for s in live if ref is not None and ref in s.refs]
        pool = warm or [s for s in live if s.node is not None] or live
        return min(pool, key=lambda s: (len(s.jobs), len(s.refs), s.index))

    def _dispatch(self, sent: _Sent) -> None:
        with self._lock:
            if self._closed:
                raise UnavailableError("the server is stopping")
            try:
                slot = self._choose(sent.ref)
            except UnavailableError:
                if any(not s.alive for s in self._slots):  # a replacement is on its way: it takes this one
                    sent.slot = next(s for s in self._slots if not s.alive)
                    self._jobs[sent.job_id] = sent
                    return
                raise
            sent.slot = slot
            slot.jobs.add(sent.job_id)
            if sent.ref:
                slot.refs.add(sent.ref)
            self._jobs[sent.job_id] = sent
            getattr(slot.handle, sent.op).remote(*sent.args)

    # ---------------------------------------------------------------- the worker seam
    def _check_started(self) -> None:
        self._ensure()
        if self._no_room is not None:
            raise UnavailableError(self._no_room, "add such a node, or change --predict-cpus, --predict-gpus or "
                                                  "--predict-ray-resource")

    def submit(self, job_id: str, ref: str, data: dict[str, Any], owner: str = "") -> None:
        self._check_started()
        self._dispatch(_Sent(job_id, "submit", (job_id, ref, data, owner), ref))

    def compare(self, job_id: str, spec: dict[str, Any]) -> None:
        self._check_started()
        self._dispatch(_Sent(job_id, "compare", (job_id, spec), None))

    def cancel(self, job_id: str) -> None:
        with self._lock:
            sent = self._jobs.get(job_id)
            if sent is None:
                return
            sent.canceled = True
            slot = sent.slot
        if slot is not None and slot.alive:
            try:
                slot.handle.cancel.remote(job_id)
            except Exception:  # lost meanwhile: the loss settles it
                pass

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """Each actor's cache accounting, batching counters and node (``workers``)."""
        import ray

        self._ensure()
        with self._lock:
            slots = [s for s in self._slots if s.alive]
        out = []
        for slot in slots:
            try:
                out.append(ray.get(slot.handle.stats.remote(), timeout=timeout))
            except Exception as err:
                out.append({"name": slot.name, "error": one_line(err)})
        return {"executor": "ray", "workers": out}

    def close(self) -> None:
        import ray

        with self._lock:
            self._closed = True
            slots, self._slots = self._slots, []
        for slot in slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:
                pass
        if self.gate is not None:
            self.gate.close()
