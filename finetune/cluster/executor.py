"""The Ray executor: the queue's :class:`~finetune.queue.executor.Executor` seam, over a Ray cluster.

The queue keeps deciding what runs and when (FIFO, cancel, at most ``capacity`` at once); this module turns a
training id into a detached Ray actor (:class:`~finetune.cluster.runner.TrainingActor`) that Ray places on a node
with the resources asked for, and watches it:

- resources: a ``gpu`` destination's training asks for one GPU per process, a ``cpu`` one for none (``auto``: GPUs
  when the cluster has any); every process asks for ``--cpus-per-process`` CPUs and the ``--ray-resource``
  custom resources; processes: ``train.processes``, else ``--gpus-per-training`` for GPU trainings, else 1.
- warm actors: ``--warm-actors`` idle actors of the common shape are kept started (imports done), so a training
  starts at once; one is created again after each start.
- node loss: an actor that dies (Ray reports it once the node is declared dead) leaves its training unsettled;
  the executor notes the lost node in the record and the log and starts the next attempt in a new actor, which
  continues from the newest checkpoint, up to ``--max-retries`` times; then the training ends ``failed``,
  naming the lost nodes. A published version is never published again (``run_training``'s claim settles it).
- restarts: actors are detached and named, so trainings go on while the server restarts; the next server
  re-attaches to them by the name in their record (:meth:`RayExecutor.adopt`), or queues again those whose actor
  is gone (a Ray started by the server itself ends with it, and its trainings are queued again at the next start).
- nodes that cannot see the registry are kept out (:class:`~finetune.cluster.nodes.NodeGate`).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import Any

from ..errors import UsageError
from ..registry import Registry
from ..registry.jobs import FINAL, Status, TrainingRecord, Trainings
from ..training.runlog import RunLog
from .nodes import NodeGate
from .options import ClusterOptions
from .placement import actor_options, count_capacity, has_gpus, infeasible, plan_attempt
from .runner import TrainingActor
from .session import connect, describe_node, namespace_for, nodes, short

WAIT_S = 20.0  # how long one outstanding wait() call on an actor lasts before it is renewed
WATCH_S = 2.0  # how often nodes and warm actors are looked at


class RayJob:
    """One training on the cluster, across its attempts (the queue's :class:`~finetune.queue.executor.Job`)."""

    # Detached actors go on when the server stops; the next server re-attaches (a Ray the server started ends
    # with it, its trainings with it: their records are queued again at the next start).
    outlives_server = True

    def __init__(self, executor: RayExecutor, training_id: str, handle: Any, name: str, node: dict[str, Any],
                 processes: int = 1):
        self.executor, self.training_id = executor, training_id
        self.handle, self.name, self.node = handle, name, node
        self.processes = processes
        self._wait = handle.wait.remote(WAIT_S)
        self._code: int | None = None
        self._stopping = False

    def poll(self) -> int | None:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        if self._code is not None:
            return self._code
        ready, _ = ray.wait([self._wait], timeout=0)
        if not ready:
            return None
        try:
            outcome = ray.get(self._wait)
        except ActorUnavailableError:  # unreachable (its node may be dying): ask again until Ray decides
            self._wait = self.handle.wait.remote(WAIT_S)
            return None
        except (ActorDiedError, RayActorError):
            outcome = {"ended": "died"}
        if outcome is None:
            self._wait = self.handle.wait.remote(WAIT_S)
            return None
        self._code = self.executor.ended(self, outcome)
        return self._code

    def stop(self) -> None:
        self._stopping = True
        try:
            self.handle.stop.remote()
        except Exception:  # already gone: the cancel marker the queue left reaches the next attempt, if any
            pass

    def kill(self) -> None:
        import ray

        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:
            pass

    def relaunch(self, handle: Any, name: str, node: dict[str, Any]) -> None:
        self.handle, self.name, self.node = handle, name, node
        self._wait = handle.wait.remote(WAIT_S)


class RayExecutor:
    """Trainings as Ray actors on a cluster sharing the registry (see the module docstring)."""

    def __init__(self, registry: Registry, options: ClusterOptions, workers: int | None = None,
                 say: Callable[[str], None] = print):
        import ray

        self.registry, self.options, self.workers, self.say = registry, options, workers, say
        self.trainings = Trainings(registry)
        self.how = connect(options.address, registry.root)
        self.namespace = namespace_for(registry.root)
        self._actor_class = ray.remote(TrainingActor)
        self._lock = threading.RLock()
        self._spares: list[tuple[Any, str, Any]] = []  # (handle, name, info ref): idle warm actors
        self._jobs: dict[str, RayJob] = {}
        self._closed = threading.Event()
        self.gate = NodeGate(registry, say=lambda line: self.say(f"finetune: {line}"))
        self.gate.refresh(wait_s=30.0)
        self._capacity = count_capacity(self.options, self.gate.usable())
        self.say(f"finetune: trainings run on {self.how}: {len(self.gate.usable())} usable node(s), "
                 f"{self.capacity} training(s) at once")
        self._reap_idle_actors()
        self._refill()
        self._watcher = threading.Thread(target=self._watch, name="ray-executor", daemon=True)
        self._watcher.start()

    # ---------------------------------------------------------------- the Executor seam
    @property
    def capacity(self) -> int:
        return self.workers or self._capacity

    def start(self, training_id: str) -> RayJob:
        record = self.trainings.get(training_id)
        attempt = int((record.placement or {}).get("attempts", 0)) + 1
        with self._lock:
            handle, name, node, processes = self._launch(record, attempt)
            job = RayJob(self, training_id, handle, name, node, processes)
            self._jobs[training_id] = job
        return job

    def adopt(self, record: TrainingRecord) -> RayJob | None:
        """Re-attach to a training a previous server left running in the cluster; None when it is not running
        (its stale pid, which was a cluster node's, is then forgotten so the queue does not look for it here)."""
        import ray

        placement = record.placement or {}
        if placement.get("executor") != "ray" or not placement.get("actor"):
            return None
        try:
            handle = ray.get_actor(placement["actor"], namespace=self.namespace)
            info = ray.get(handle.info.remote(), timeout=30)
        except Exception:
            info = None
        if info is None or info.get("training_id") != record.id or info.get("done"):
            if record.pid and record.status not in FINAL:
                self.trainings.update(record, pid=None)
            return None
        with self._lock:
            job = RayJob(self, record.id, handle, placement["actor"], info, max(1, len(placement.get("nodes") or [])))
            self._jobs[record.id] = job
        self.say(f"finetune: training {record.id} still runs on {describe_node(info['node_id'], info)}: re-attached")
        return job

    def refill(self) -> None:
        with self._lock:
            self._jobs = {i: j for i, j in self._jobs.items() if j._code is None}
        self._refill()

    def close(self) -> None:
        self._closed.set()
        self._watcher.join(timeout=5)
        self._drop_spares()
        self.gate.close()

    # ---------------------------------------------------------------- what a training asks for
    def plan(self, record: TrainingRecord, attempt: int) -> dict[str, Any]:
        """The resources, processes and node exclusions of one attempt (see :func:`.placement.plan_attempt`)."""
        try:
            hardware = self.registry.get_model(record.destination).hardware
        except Exception:
            hardware = "auto"
        return plan_attempt(self.options, self.gate, hardware, record.input, attempt)

    def _new_actor(self, plan: dict[str, Any]) -> tuple[Any, str]:
        name = f"train-{secrets.token_hex(6)}"
        options = actor_options(name, self.namespace, plan)
        handle = self._actor_class.options(**options).remote(str(self.registry.root), name)
        return handle, name

    def _launch(self, record: TrainingRecord, attempt: int) -> tuple[Any, str, dict[str, Any], int]:
        plan = self.plan(record, attempt)
        problem = infeasible(plan, self.gate.usable())
        if problem is not None:  # Ray would keep it pending for ever: the queue fails it with this reason
            raise UsageError(problem, "add such a node, or change --cpus-per-process, --ray-resource or the "
                                      "destination's hardware")
        spare = None
        if plan["processes"] == 1 and plan["gpu"] == self._spare_gpu():
            spare = self._take_spare(plan["refused"])
        node: dict[str, Any] = {}
        if spare is None:
            if plan["processes"] > 1:
                self._drop_spares()  # they would hold resources the training's workers wait for
            handle, name = self._new_actor(plan)
        else:
            handle, name, node = spare
        # The record names the actor and the attempt before the actor runs (it then writes the record itself), so
        # a server restarting meanwhile can re-attach, and a loss before the run starts is counted as this attempt.
        placement = {**(record.placement or {}), "executor": "ray", "actor": name, "attempts": attempt,
                     "host": node.get("host"), "node_id": node.get("node_id"), "nodes": [node] if node else []}
        self.trainings.update(record, placement=placement)
        handle.run.remote(record.id, plan)
        return handle, name, node, plan["processes"]

    # ---------------------------------------------------------------- warm actors
    def _spare_gpu(self) -> bool:
        return has_gpus(self.gate.usable())

    def _take_spare(self, refused: list[str]) -> tuple[Any, str, dict[str, Any]] | None:
        """An idle warm actor (with where it runs, when known), ready ones first."""
        import ray

        ready_first = sorted(self._spares, key=lambda s: not ray.wait([s[2]], timeout=0)[0])
        for spare in ready_first:
            self._spares.remove(spare)
            handle, name, info_ref = spare
            node: dict[str, Any] = {}
            if ray.wait([info_ref], timeout=0)[0]:
                try:
                    info = ray.get(info_ref)
                except Exception:
                    continue  # it died (its node went away): take the next
                if info["node_id"] in refused:
                    ray.kill(handle, no_restart=True)
                    continue
                node = {"host": info["host"], "node_id": info["node_id"]}
            return handle, name, node  # ready, or still being placed: Ray places it as it would a new one
        return None

    def _drop_spares(self) -> None:
        import ray

        with self._lock:  # taken under the lock _refill adds them under; killed outside it
            spares, self._spares = self._spares, []
        for handle, _, _ in spares:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass

    def _refill(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            running = [j for j in self._jobs.values() if j._code is None]
            if any(j.processes > 1 for j in running):
                return  # spares would hold resources a multi-process training's workers may need
            want = min(self.options.warm_actors, max(0, self.capacity - len(running)))
            while len(self._spares) < want:
                plan = {"processes": 1, "gpu": self._spare_gpu(), "cpus": self.options.cpus_per_process,
                        "resources": dict(self.options.resources), "refused": self.gate.refused()}
                handle, name = self._new_actor(plan)
                self._spares.append((handle, name, handle.info.remote()))

    def _reap_idle_actors(self) -> None:
        """Idle actors a previous server left in this registry's namespace (its warm ones): they hold resources."""
        import ray
        from ray.util import list_named_actors

        for entry in list_named_actors(all_namespaces=True):
            if entry.get("namespace") != self.namespace:
                continue
            try:
                handle = ray.get_actor(entry["name"], namespace=self.namespace)
                info = ray.get(handle.info.remote(), timeout=10)
            except Exception:
                continue
            if info.get("training_id") is None or info.get("done"):
                ray.kill(handle, no_restart=True)

    # ---------------------------------------------------------------- nodes
    def _watch(self) -> None:
        said = None
        while not self._closed.wait(WATCH_S):
            try:
                with self._lock:  # the dispatcher reads the verdicts (plan, capacity) under the same lock
                    if self.gate.refresh():
                        self._capacity = count_capacity(self.options, self.gate.usable())
                        # a warm actor on a node refused since is of no use
                        self._spares = [s for s in self._spares if self._spare_usable(s)]
                self._refill()
                said = None
            except Exception as err:  # the cluster is unreachable for a moment: try again at the next look
                line = f"finetune: ray executor: {type(err).__name__}: {err}"
                if line != said:
                    self.say(line)
                said = line

    def _spare_usable(self, spare: tuple[Any, str, Any]) -> bool:
        import ray

        ready, _ = ray.wait([spare[2]], timeout=0)
        if not ready:
            return True
        try:
            node_id = ray.get(spare[2])["node_id"]
        except Exception:
            return False
        if node_id in self.gate.usable_ids():
            return True
        ray.kill(spare[0], no_restart=True)
        return False

    # ---------------------------------------------------------------- an attempt ended
    def ended(self, job: RayJob, outcome: dict[str, Any]) -> int | None:
        """Settle or retry after an attempt's end; the queue's exit status (None: a new attempt runs)."""
        record = self.trainings.get(job.training_id)
        if record.status in FINAL:
            return 0 if record.status == Status.SUCCEEDED else 1
        if self.registry.published_by(record.destination, record.id) is not None:
            return 0  # published, then lost before saying so: the queue settles it succeeded
        if outcome["ended"] == "error":
            self.trainings.update(record, status=Status.FAILED, error=outcome["error"])
            return 1
        if job._stopping:
            return 1  # canceled: the queue settles it so
        return self._lost(job, record, outcome)

    def _lost(self, job: RayJob, record: TrainingRecord, outcome: dict[str, Any]) -> int | None:
        placement = dict(record.placement or {})
        attempt = int(placement.get("attempts") or 1)
        alive = {n.node_id for n in nodes() if n.alive}
        ran_on = placement.get("nodes") or ([job.node] if job.node.get("node_id") else [])
        dead = [n for n in ran_on if n["node_id"] not in alive]
        if dead:
            lost = [{**n, "attempt": attempt, "why": "node lost"} for n in dead]
        else:
            why = "its worker died" if outcome["ended"] == "lost" else "its process died"
            lost = [{**n, "attempt": attempt, "why": why} for n in ran_on[:1]] or \
                [{"node_id": "?", "host": "?", "attempt": attempt, "why": why}]
        placement["lost"] = list(placement.get("lost") or []) + lost
        words = ", ".join(f"{e['why']}: {_describe(e)}" for e in lost)
        max_attempts = 1 + self.options.max_retries
        log = RunLog(self.registry.training_paths(record.id).log, echo=False)
        if attempt < max_attempts:
            log.info(f"attempt {attempt} of {max_attempts} ended ({words}); starting attempt {attempt + 1} elsewhere")
            log.close()
            self.trainings.update(record, pid=None, placement=placement)
            self.say(f"finetune: training {record.id}: {words}; starting attempt {attempt + 1} of {max_attempts}")
            with self._lock:
                handle, name, node, _ = self._launch(record, attempt + 1)
            job.relaunch(handle, name, node)
            return None
        names = "; ".join(f"{_describe(e)} at attempt {e['attempt']} ({e['why']})" for e in placement["lost"])
        error = (f"lost {names}; {attempt} attempt{'s' if attempt > 1 else ''}, all that --max-retries "
                 f"{self.options.max_retries} allows; nothing was published")
        log.info(f"failed: {error}")
        log.close()
        self.trainings.update(record, status=Status.FAILED, error=error, pid=None, placement=placement)
        return 1


def _describe(entry: dict[str, Any]) -> str:
    return f"node {short(entry['node_id'])} ({entry.get('host', '?')})"
