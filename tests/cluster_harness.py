"""What the cluster tests run with: a script re-executed in a network namespace of its own (only loopback:
Ray falls back to 127.0.0.1 and nothing leaves the machine), the environment its processes inherit, and
:class:`Server`, ``finetune serve --executor ray`` as a subprocess keeping its output (started and stopped by
tests/serve_process.py). The cluster itself is :class:`finetune.cluster.local.LocalCluster` (a head without
CPUs, worker nodes with ``worker: 1`` each).

Not collected by pytest (tests/test_cluster.py runs the scenarios in tests/cluster_scenarios.py through it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from serve_process import start_server, stop_server

from finetune.launch import free_port

REPO = Path(__file__).resolve().parents[1]


def netns_available() -> str | None:
    """None when scripts can run in a network namespace of their own here, else why not."""
    from finetune.cluster.local import netns_problem

    return netns_problem()


def run_in_netns(args: list[str], timeout_s: float, log: Path) -> subprocess.CompletedProcess:
    """Run ``python ARGS...`` in a new network namespace with only loopback up; its output goes to ``log``."""
    from finetune.cluster.local import in_own_netns

    with open(log, "w") as out:
        return subprocess.run(in_own_netns([sys.executable, *args]), stdout=out, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout_s, check=False)


def quiet_environment() -> None:
    """What every process of the cluster inherits: this checkout first on the path, no hub, no usage stats."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["FINETUNE_FSYNC"] = "0"
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[key] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.pop("RAY_ADDRESS", None)


class Server:
    """``finetune serve --executor ray`` as a subprocess; its output goes to ``log``."""

    def __init__(self, root: Path, address: str, log: Path, *options: str):
        self.root, self.address, self.log = root, address, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.options = options
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> Server:
        self.started_at = time.monotonic()
        self.proc = start_server(
            [sys.executable, "-m", "finetune", "--registry", str(self.root), "serve", "--executor", "ray",
             "--ray-address", self.address, "--port", str(self.port), "--log-level", "warning", "--no-access-log",
             *self.options], self.url, self.log, timeout_s=timeout_s)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_output(self, needle: str, timeout_s: float) -> str:
        """The first line of the server's output containing ``needle``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if needle in line:
                    return line
            time.sleep(0.2)
        raise AssertionError(f"the server never said {needle!r}:\n{self.output()[-3000:]}")

    def stop(self, timeout_s: float = 60.0) -> None:
        stop_server(self.proc, timeout_s)


def write_json(path: Path, data: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def start_node_without_registry(address: str, root: Path, empty: Path) -> subprocess.Popen:
    """A worker node (``worker: 1``, ``predictor: 2``) whose registry path is the empty folder ``empty`` (a mount
    namespace with a bind mount); stop it with ``os.killpg(proc.pid, signal.SIGTERM)``."""
    ray_start = f"{sys.executable} -m ray.scripts.scripts start --address={address} --num-cpus=1 " \
                f"--resources='{{\"worker\": 1, \"predictor\": 2}}' --object-store-memory={80 * 2**20} --block " \
                f"--disable-usage-stats"
    return subprocess.Popen(["unshare", "-m", "sh", "-c", f"mount --bind {empty} {root} && exec {ray_start}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def refusal_of_node_without_registry(cluster_address: str, root: Path, workdir: Path, server: Any,
                                     refusal: str) -> str:
    """Join a node whose registry path is an empty folder (:func:`start_node_without_registry`), wait for the
    server's output line saying ``refusal`` about it, stop the node, and return that line (it must name the
    registry's path and say that the node sees another folder)."""
    empty = workdir / "empty"
    empty.mkdir(exist_ok=True)
    proc = start_node_without_registry(cluster_address, root, empty)
    try:
        line = server.wait_output(refusal, 120)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert str(root) in line and "another folder" in line, line
    return line
