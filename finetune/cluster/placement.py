"""What one attempt of a training asks the cluster for, and whether the usable nodes can ever hold it.

An attempt's *plan* (a plain dict, also passed to the actor that runs it) says how many processes it runs, whether
each takes a GPU, the CPUs and custom resources each asks for, and the nodes it must avoid (those refused by the
:class:`~finetune.cluster.nodes.NodeGate`). From it come the Ray actor's options, and, before anything is asked
of Ray, the check that some usable node (or set of nodes) fits it: Ray would keep an attempt that fits nowhere
pending for ever, so the queue fails it at once with the reason instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .nodes import NodeGate
from .options import ClusterOptions
from .session import NodeInfo


def has_gpus(usable: Sequence[NodeInfo]) -> bool:
    """Whether any usable node has a GPU (``hardware: auto`` then means a GPU)."""
    return any(n.resources.get("GPU", 0) > 0 for n in usable)


def plan_attempt(options: ClusterOptions, gate: NodeGate, hardware: str, training_input: dict[str, Any],
                 attempt: int) -> dict[str, Any]:
    """The plan of attempt ``attempt`` of a training whose destination asks for ``hardware`` (``gpu``, ``cpu``,
    ``auto``): processes from its ``train.processes``, else ``--gpus-per-training`` for GPU trainings, else 1."""
    gpu = hardware == "gpu" or (hardware == "auto" and has_gpus(gate.usable()))
    processes = (training_input.get("train") or {}).get("processes") or (options.gpus_per_training if gpu else 1)
    return {"attempt": attempt, "max_attempts": 1 + options.max_retries, "processes": int(processes),
            "gpu": gpu, "cpus": options.cpus_per_process, "resources": dict(options.resources),
            "refused": gate.refused()}


def actor_options(name: str, namespace: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Ray options of the detached, named actor that runs an attempt."""
    options: dict[str, Any] = {"name": name, "namespace": namespace, "lifetime": "detached",
                               "max_restarts": 0, "max_concurrency": 4}
    if plan["processes"] > 1:  # it only coordinates: Ray Train's workers ask for the resources
        options.update(num_cpus=0)
    else:
        options.update(num_cpus=plan["cpus"], num_gpus=1 if plan["gpu"] else 0, resources=plan["resources"])
    if plan["refused"]:
        options["label_selector"] = {"ray.io/node-id": f"!in({','.join(plan['refused'])})"}
    return options


def infeasible(plan: dict[str, Any], usable: Sequence[NodeInfo]) -> str | None:
    """Why no usable node (or set of nodes) can ever hold this attempt's processes, or None."""
    need = {"CPU": plan["cpus"], **plan["resources"]}
    if plan["gpu"]:
        need["GPU"] = 1
    fits = sum(math.floor(min(node.resources.get(k, 0) / v for k, v in need.items()) + 1e-9) for node in usable)
    if fits >= plan["processes"]:
        return None
    asked = ", ".join(f"{k} {v:g}" for k, v in need.items())
    where = "one node" if plan["processes"] == 1 else f"the usable nodes together ({fits} fit)"
    return (f"no room for this training in the cluster: {plan['processes']} process(es) of {asked} each, "
            f"and {where} cannot hold them")


def count_capacity(options: ClusterOptions, usable: Sequence[NodeInfo]) -> int:
    """How many single-process trainings the usable nodes hold at once (at least 1)."""
    gpu = has_gpus(usable)
    total = 0
    for node in usable:
        fits = [node.resources.get("CPU", 0) / options.cpus_per_process]
        if gpu:
            fits.append(node.resources.get("GPU", 0))
        fits += [node.resources.get(k, 0) / v for k, v in options.resources.items()]
        total += math.floor(min(fits) + 1e-9)
    return max(1, total)
