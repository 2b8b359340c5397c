"""A Ray cluster of several nodes on this one machine, in a network namespace of its own: for the cluster's
tests and benchmark, and for trying ``--executor ray`` without a second machine.

Ray binds the machine's network address even when told 127.0.0.1 (it even asks 8.8.8.8 which address it has);
inside a fresh network namespace the only interface is loopback, so Ray falls back to 127.0.0.1 and no packet
can leave the machine. :func:`in_own_netns` re-executes a command there (``unshare -n``, then ``ip link set lo
up``; root or user namespaces needed), and :func:`check_loopback_only` refuses to start a cluster anywhere else.

:class:`LocalCluster` is Ray's own test cluster (``ray.cluster_utils.Cluster``): a head without CPUs (trainings
never land there) and worker nodes with ``worker_cpus`` CPUs and the custom resources ``worker: 1`` and
``predictor: 2`` each, so that a server started with ``--ray-resource worker=1`` keeps its trainings on the
workers, one per worker, and one with ``--predict-cpus 0 --predict-ray-resource predictor=1`` its inference
actors, up to two per worker, beside them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence

OBJECT_STORE_BYTES = 80 * 2**20  # Ray's smallest object store; trainings pass ids and small dicts, not data
# Ray declares a node dead after its health checks fail this many times in a row (defaults: every 3 s, 5 times,
# so ~15-30 s); tests shorten it to ~2 s.
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


def netns_problem() -> str | None:
    """None when a command can run in a network namespace of its own here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip() or probe.returncode}"
    return None


def in_own_netns(argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` in a new network namespace with only loopback, up."""
    return ["unshare", "-n", "sh", "-c", "ip link set lo up && exec " + " ".join(shlex.quote(str(a)) for a in argv)]


def loopback_only() -> bool:
    return sorted(name for _, name in socket.if_nameindex()) == ["lo"]


def check_loopback_only() -> None:
    """Refuse to go on unless loopback is this network namespace's only interface."""
    if not loopback_only():
        names = sorted(name for _, name in socket.if_nameindex())
        raise SystemExit(f"refusing to start a Ray cluster with network interfaces {names}: run it in a network "
                         f"namespace of its own ({' '.join(in_own_netns([sys.executable, '...'])[:4])} ...)")


class LocalCluster:
    """A head (no CPUs) and ``workers`` worker nodes (``worker_cpus`` CPUs, ``worker: 1``, ``predictor: 2`` each)."""

    def __init__(self, workers: int = 2, worker_cpus: float = 1, fast_health_checks: bool = True):
        from ray.cluster_utils import Cluster

        check_loopback_only()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.worker_cpus = worker_cpus
        head = {"num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES}
        if fast_health_checks:
            head["_system_config"] = FAST_HEALTH_CHECKS
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.workers: list = []
        for _ in range(workers):
            self.add_worker()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=self.worker_cpus, resources={"worker": 1, "predictor": 2},
                                     object_store_memory=OBJECT_STORE_BYTES)
        self.workers.append(node)
        return node

    def worker_ids(self) -> list[str]:
        return [n.node_id for n in self.workers]

    def kill(self, node_id: str) -> None:
        """Kill a worker node's processes at once (raylet, object store; its workers die with them)."""
        node = next(n for n in self.workers if n.node_id == node_id)
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        self.cluster.shutdown()
