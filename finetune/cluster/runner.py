"""What runs on the cluster's nodes: one Ray actor per training attempt, calling the same ``run_training(id)``
the local worker calls.

:class:`TrainingActor` starts idle ("warm": it imports the training stack at once, as the local executor's spare
worker does) and is then given one training by :meth:`TrainingActor.run`. A single-process training runs in the
actor itself (Ray gave it the CPUs and GPU it asked for); a training of ``N`` processes runs as a Ray Train
``TorchTrainer`` of ``N`` workers, which Ray places (possibly on several nodes) and joins in one process group
that accelerate picks up, each worker calling ``run_training``; rank 0 alone writes the record and publishes.
When its training ended, the actor exits, so every training gets a fresh process (its memory, GPU memory
included, goes back to the node).

Outcomes (:meth:`TrainingActor.wait`): ``settled`` (``run_training`` left the record final), ``error`` (it raised
without settling it: refused to claim it) or ``lost`` (a worker of a multi-process run died with its node). An
actor that dies (its node lost) reports nothing: the server sees it die, and starts the training again elsewhere
(:mod:`finetune.cluster.executor`), from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from typing import Any

from ..errors import one_line
from ..registry import Registry
from ..registry.jobs import FINAL, Trainings
from ..training.runlog import RunLog
from .session import short

CANCEL_REFRESH_S = 0.5


def newest_step(registry: Registry, training_id: str) -> int | None:
    """The step of the newest intact checkpoint the next attempt continues from (None: none yet)."""
    from ..training.checkpoint import Progress, check_checkpoint, checkpoints

    for ckpt in checkpoints(registry.training_paths(training_id).checkpoints):
        if check_checkpoint(ckpt) is None:
            return Progress.from_dict(json.loads((ckpt / "state.json").read_text())).step
    return None


def begin_attempt(registry: Registry, training_id: str, attempt: int, actor: str, where: list[dict[str, Any]],
                  max_attempts: int) -> None:
    """Write where this attempt runs into the record (and the log, when it follows a lost one). ``where``: one
    ``{"host", "node_id"}`` per process, rank order. The previous attempt is dead: its pid is forgotten, or the
    claim would check it on this host."""
    trainings = Trainings(registry)
    record = trainings.get(training_id)
    previous = dict(record.placement or {})
    placement = {**previous, "executor": "ray", "actor": actor, "attempts": attempt, "max_attempts": max_attempts,
                 "host": where[0]["host"], "node_id": where[0]["node_id"], "nodes": where}
    placement.setdefault("lost", [])
    trainings.update(record, pid=None, placement=placement)
    if attempt > 1:
        step = newest_step(registry, training_id)
        after = ""
        if placement["lost"]:
            last = placement["lost"][-1]
            after = f" after {last['why']} ({_node(last)})"
        frm = f"its newest checkpoint, step {step}" if step is not None else "step 0 (no checkpoint yet)"
        hosts = ", ".join(_node(w) for w in where)
        log = RunLog(registry.training_paths(training_id).log, echo=False)
        log.info(f"attempt {attempt} of {max_attempts} on {hosts}{after}: continuing from {frm}")
        log.close()


def _node(entry: dict[str, Any]) -> str:
    return f"node {short(entry['node_id'])} on {entry['host']}"


def _here() -> dict[str, Any]:
    import ray

    return {"host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}


class TrainingActor:
    """One training attempt on a node (see the module docstring). Methods are called by the server."""

    def __init__(self, root: str, name: str):
        self.root, self.name = root, name
        self.registry = Registry(root)
        self.where = _here()
        self.training_id: str | None = None
        self.outcome: dict[str, Any] | None = None
        self._imported = threading.Event()
        self._done = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._import, name="imports", daemon=True).start()

    def _import(self) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            from ..training import run  # noqa: F401  (torch, transformers, peft: seconds, done before anyone waits)
        except Exception:
            pass  # the run imports it again and reports the error in the record
        finally:
            self._imported.set()

    # ---------------------------------------------------------------- the server's calls
    def info(self) -> dict[str, Any]:
        """Where this actor runs and what (``training_id`` None: idle)."""
        return {**self.where, "pid": os.getpid(), "training_id": self.training_id, "done": self._done.is_set()}

    def run(self, training_id: str, plan: dict[str, Any]) -> dict[str, Any]:
        """Start the training (``plan``: attempt, max_attempts, processes, gpu, cpus, resources, refused)."""
        if self.training_id is not None:
            raise RuntimeError(f"actor {self.name} already runs training {self.training_id}")
        self.training_id = training_id
        threading.Thread(target=self._main, args=(training_id, plan), name=f"training-{training_id}",
                         daemon=True).start()
        return self.info()

    def stop(self) -> None:
        """Stop the run at its next step: the cancel marker is kept in place until it ends (the run's claim
        clears a marker left from before, so one touch could be lost if it came first)."""
        if not self._stop.is_set():
            self._stop.set()
            threading.Thread(target=self._keep_cancel_marker, name="cancel", daemon=True).start()

    def wait(self, timeout_s: float) -> dict[str, Any] | None:
        """The outcome once the training ended, or None after ``timeout_s``."""
        self._done.wait(timeout_s)
        return self.outcome

    def exit(self) -> None:
        import ray

        ray.actor.exit_actor()

    # ---------------------------------------------------------------- on this node
    def _keep_cancel_marker(self) -> None:
        marker = self.registry.training_paths(self.training_id).cancel
        while not self._done.is_set():
            try:
                marker.touch()
            except OSError:
                pass
            self._done.wait(CANCEL_REFRESH_S)

    def _main(self, training_id: str, plan: dict[str, Any]) -> None:
        try:
            self._imported.wait()
            if plan["processes"] > 1:
                outcome = self._run_distributed(training_id, plan)
            else:
                begin_attempt(self.registry, training_id, plan["attempt"], self.name, [self.where],
                              plan["max_attempts"])
                outcome = run_here(self.registry, training_id)
        except BaseException as err:  # a bug of ours: the record is left to the server, which settles it
            outcome = {"ended": "error", "error": one_line(err)}
        self.outcome = outcome
        self._done.set()
        import ray

        # Exit so the CPUs and GPUs go back at once; exit_actor works in a method, so ask ourselves to call it.
        ray.get_runtime_context().current_actor.exit.remote()

    def _run_distributed(self, training_id: str, plan: dict[str, Any]) -> dict[str, Any]:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        resources = {"CPU": plan["cpus"], **plan["resources"]}
        if plan["gpu"]:
            resources["GPU"] = 1
        selector = {"ray.io/node-id": f"!in({','.join(plan['refused'])})"} if plan["refused"] else None
        storage = self.registry.staging_dir("ray-train")  # Ray Train's own run files, on the shared filesystem
        trainer = TorchTrainer(
            rank_main,
            train_loop_config={"root": self.root, "training_id": training_id, "attempt": plan["attempt"],
                               "actor": self.name, "max_attempts": plan["max_attempts"]},
            scaling_config=ScalingConfig(num_workers=plan["processes"], use_gpu=plan["gpu"],
                                         resources_per_worker=resources, label_selector=selector),
            # A lost worker ends this attempt; the server starts the next one, as for a single-process run.
            run_config=RunConfig(name=f"finetune-{training_id}", storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        try:
            trainer.fit()
        except Exception as err:
            record = Trainings(self.registry).get(training_id)
            if record.status in FINAL:
                return {"ended": "settled"}
            return {"ended": "lost", "error": one_line(err)}
        finally:
            from .. import atomic

            atomic.remove_tree(storage)
        return _settled_or_error(self.registry, training_id, None)


def run_here(registry: Registry, training_id: str) -> dict[str, Any]:
    """``run_training`` in this process; the outcome for the server."""
    from ..training.run import run_training

    error = None
    try:
        run_training(training_id, registry=registry, progress=False)
    except Exception as err:  # the record says why (or, if it was not ours to run, the outcome does)
        error = str(err)
    return _settled_or_error(registry, training_id, error)


def _settled_or_error(registry: Registry, training_id: str, error: str | None) -> dict[str, Any]:
    record = Trainings(registry).get(training_id)
    if record.status in FINAL:
        return {"ended": "settled"}
    return {"ended": "error", "error": error or "the run ended without settling its record"}


def rank_main(config: dict[str, Any]) -> None:
    """One process of a multi-process training (Ray Train's ``train_loop_per_worker``)."""
    import torch.distributed as dist

    from ..training.run import run_training

    registry = Registry(config["root"])
    world, rank = dist.get_world_size(), dist.get_rank()
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, _here())
    if rank == 0:
        begin_attempt(registry, config["training_id"], config["attempt"], config["actor"], everyone,
                      config["max_attempts"])
    dist.barrier()
    try:
        run_training(config["training_id"], registry=registry, progress=False)
    except Exception:
        pass  # settled in the record by rank 0; raising would make Ray Train count a failed attempt
