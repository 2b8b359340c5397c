#!/usr/bin/env python
"""Benchmark ``finetune serve --executor ray`` on a local three-node Ray cluster against the local executor.

    python scripts/bench_cluster.py                         # pick-up x5 each, a ~60 s training x2 each, one node loss
    python scripts/bench_cluster.py --pickups 2 --long-steps 50 --long-repeats 1     # a quick look

Both servers run at once, each over its own registry holding the same base model (a random Llama built here,
hidden ``--hidden``, 4 layers) and the shipped sample data: ``finetune serve --workers 1`` (the local executor:
one worker process) and ``finetune serve --executor ray`` on a head without CPUs and two worker nodes with one
CPU each (``finetune.cluster.local.LocalCluster``), trainings asking for ``--ray-resource worker=1``. Every
training process runs torch on one thread on both sides (``OMP_NUM_THREADS=1``; Ray gives a one-CPU actor one
thread), so the two differ only in how a training is started and watched. The script runs itself in a network
namespace of its own (``unshare -n``): Ray falls back to 127.0.0.1 there, and nothing leaves the machine.

- pick-up: ``--pickups`` trainings of 2 steps each per executor, one at a time on an idle queue (after
  ``--idle`` seconds, so warm workers are ready): ``POST .../trainings`` until a worker claimed the record (the
  executor's part) and until it is ``processing`` (model and data loaded, first step begins). Target: under 2 s.
- overhead: a training of ``--long-steps`` steps (~60 s on a quiet 2-core machine), ``--long-repeats`` times per
  executor, alternating: POST until ``succeeded``, Ray's time over the local one's, and the same for the CPU
  seconds each side's processes used meanwhile (the Ray side's include the cluster's daemons): on a machine
  shared with other jobs wall times swing with their load, the CPU spent to finish the same training does not.
  Target: under 10%.
- node loss: a Ray training checkpointing every 10 steps; once it has a checkpoint, its node is killed. Detected:
  the kill until the server has recorded the node as lost; resumed: until the next attempt, on the other node,
  has taken a step past its checkpoint. With Ray's default health checks (a node is declared dead after 5 failed
  checks 3 s apart) unless ``--fast-health-checks``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_PICKUP_S = 2.0
TARGET_OVERHEAD = 0.10
FINAL = ("succeeded", "failed", "canceled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pickups", type=int, default=5, help="pick-up trainings per executor (default 5)")
    p.add_argument("--idle", type=float, default=30.0,
                   help="seconds of idle queue before each pick-up, for the warm workers to be ready (default 30)")
    p.add_argument("--long-steps", type=int, default=150, help="steps of the overhead training (default 150)")
    p.add_argument("--long-repeats", type=int, default=2, help="overhead trainings per executor (default 2)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the benchmark model (default 256)")
    p.add_argument("--fast-health-checks", action="store_true",
                   help="declare a lost node dead after ~2 s instead of Ray's default ~15-30 s")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the working folder (registries, server logs)")
    return p.parse_args(argv)


class Server:
    """``finetune serve`` in its own process over ``root`` (started and stopped by tests/serve_process.py)."""

    def __init__(self, root: Path, log: Path, *options: str):
        from serve_process import start_server

        from finetune.launch import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_server([sys.executable, "-m", "finetune", "--registry", str(root), "serve", "--port",
                                  str(self.port), "--no-access-log", "--log-level", "warning", *options],
                                 self.url, log, timeout_s=300)

    def stop(self) -> None:
        from serve_process import stop_server

        stop_server(self.proc)


class CpuMeter:
    """CPU seconds (user + system) of a set of processes over a window, sampled every 0.2 s in a thread: on a
    machine shared with other jobs, wall time swings with their load, while the CPU a side spends to finish the
    same training does not. A process that ends between two samples loses at most 0.2 s of its CPU."""

    def __init__(self, processes: Callable[[], list]):
        import threading

        self.processes = processes
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._sample()
        self.first = dict(self.last)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        for proc in self.processes():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            self.last[proc.pid] = times.user + times.system

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def stop(self) -> dict[int, float]:
        """CPU seconds used in the window, per process id."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return {pid: cpu - self.first.get(pid, 0.0) for pid, cpu in self.last.items()}


def tree(pid: int) -> list:
    """A process and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class Side:
    """One executor: its registry, server and client."""

    def __init__(self, name: str, root: Path, model_dir: Path, log: Path, *options: str):
        import httpx

        from finetune.registry import Registry
        from finetune.registry.accounts import Accounts
        from finetune.registry.jobs import Trainings
        from finetune.registry.sources import import_base

        self.name = name
        self.reg = Registry(root)
        self.trainings = Trainings(self.reg)
        self.base = import_base(self.reg, "base/x", str(model_dir), visibility="public").id
        token = Accounts(self.reg).create_token("bench")
        self.reg.create_model("bench/out", hardware="cpu")
        from finetune.tiny import sample_data_path

        self.server = Server(root, log, "--allow-data-dir", str(sample_data_path().parent), *options)
        self.http = httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def post(self, input: dict) -> tuple[str, float]:
        from finetune.tiny import sample_data_path

        body = {"destination": "bench/out",
                "input": {"data": {"path": str(sample_data_path()), "max_seq_len": 128}, "train.batch_size": 4,
                          **input}}
        t0 = time.perf_counter()
        r = self.http.post(f"/v1/models/base/x/versions/{self.base}/trainings", json=body)
        r.raise_for_status()
        return r.json()["id"], t0

    def wait(self, training_id: str, statuses: tuple[str, ...], timeout_s: float = 900) -> float:
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.trainings.get(training_id)
            if record.status in statuses:
                return time.perf_counter()
            if record.status in FINAL:
                raise SystemExit(f"{self.name}: training {training_id} {record.status}: {record.error}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: training {training_id} still {record.status}")
            time.sleep(0.01)

    def pickup(self, idle_s: float) -> tuple[float, float]:
        """(POST until a worker claimed the record (its pid is in it), POST until processing) in seconds: the
        first is the executor's part; from the claim on, both sides run the same code (load model and data)."""
        time.sleep(idle_s)
        training_id, t0 = self.post({"train.max_steps": 2})
        claimed = None
        while True:
            record = self.trainings.get(training_id)
            if claimed is None and record.pid:
                claimed = time.perf_counter() - t0
            if record.status in ("processing", *FINAL):
                processing = time.perf_counter() - t0
                break
            time.sleep(0.01)
        self.wait(training_id, ("succeeded",))
        return (claimed if claimed is not None else processing), processing

    def long(self, steps: int, processes: Callable[[], list]) -> dict[str, float]:
        """POST until succeeded and the run's own training time (seconds), with the CPU seconds used meanwhile
        by ``processes`` (this side's) and by the training's process alone."""
        meter = CpuMeter(processes)
        training_id, t0 = self.post({"train.max_steps": steps})
        pid = None
        while True:
            record = self.trainings.get(training_id)
            pid = pid or record.pid
            if record.status in FINAL:
                break
            time.sleep(0.05)
        took = time.perf_counter() - t0
        cpu = meter.stop()
        if record.status != "succeeded":
            raise SystemExit(f"{self.name}: training {training_id} {record.status}: {record.error}")
        return {"wall_s": took, "loop_s": float(record.metrics.get("total_time_s") or 0),
                "cpu_s": sum(cpu.values()), "training_cpu_s": cpu.get(pid, 0.0)}


def node_loss(side: Side, cluster) -> dict:
    from finetune.training.checkpoint import checkpoints
    from finetune.training.metrics import MetricsLog

    training_id, _ = side.post({"train.max_steps": 100_000, "train.checkpoint_every": 10})
    side.wait(training_id, ("processing",))
    paths = side.reg.training_paths(training_id)
    while not checkpoints(paths.checkpoints):
        time.sleep(0.05)
    victim = side.trainings.get(training_id).placement["node_id"]
    t0 = time.perf_counter()
    cluster.kill(victim)
    detected = resumed = None
    step = None
    while resumed is None:
        record = side.trainings.get(training_id)
        placement = record.placement or {}
        if detected is None and placement.get("lost"):
            detected = time.perf_counter() - t0
        if placement.get("attempts") == 2 and record.resumed_from_step is not None and record.pid:
            step = record.resumed_from_step
            rows = MetricsLog(paths.metrics).read()
            if any(r["step"] > step for r in rows):
                resumed = time.perf_counter() - t0
        if time.perf_counter() - t0 > 600:
            raise SystemExit(f"no recovery in 600 s: {record.status} {record.error}")
        time.sleep(0.02)
    side.http.post(f"/v1/trainings/{training_id}/cancel")
    side.wait(training_id, FINAL)
    return {"detected_s": round(detected, 2), "resumed_s": round(resumed, 2), "from_step": step,
            "moved_to": side.trainings.get(training_id).placement["node_id"][:8], "lost": victim[:8]}


def cpu_name() -> str:
    """``AMD EPYC (family 25, model 1)``: the model name alone can be as vague as that under a hypervisor."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))  # serve_process: the servers in their own processes
    from finetune.cluster.local import LocalCluster, in_own_netns, loopback_only, netns_problem

    if not loopback_only():  # run again, in a network namespace of our own
        problem = netns_problem()
        if problem:
            raise SystemExit(f"bench_cluster: {problem}")
        return subprocess.call(in_own_netns([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]))

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "FINETUNE_FSYNC": "0", "OMP_NUM_THREADS": "1",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    from finetune.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    print(f"bench_cluster: {cpu_name()}, {os.cpu_count()} CPUs; working in {work}", flush=True)
    model_dir = build_tiny_model(work / "model", hidden_size=args.hidden, num_layers=4, num_heads=4)
    cluster = None
    sides: list[Side] = []
    try:
        t0 = time.perf_counter()
        cluster = LocalCluster(workers=2, fast_health_checks=args.fast_health_checks)
        print(f"cluster of 3 nodes up in {time.perf_counter() - t0:.1f} s", flush=True)
        local = Side("local", work / "local", model_dir, work / "local.log", "--workers", "1")
        ray = Side("ray", work / "ray", model_dir, work / "ray.log", "--executor", "ray", "--ray-address",
                   cluster.address, "--ray-resource", "worker=1")
        sides = [local, ray]
        for side in sides:  # warm-up: the first training of each (imports, tokenized-data cache)
            side.pickup(0)
        pickups: dict[str, list[tuple[float, float]]] = {s.name: [] for s in sides}
        for _ in range(args.pickups):
            for side in sides:
                pickups[side.name].append(side.pickup(args.idle))
        print(f"\npick-up: {args.pickups} trainings each on an idle queue, POST until a worker claimed the record, "
              f"and until processing (model and data loaded; target {TARGET_PICKUP_S:.0f} s)")
        for name, values in pickups.items():
            claimed, processing = [c for c, _ in values], [p for _, p in values]
            verdict = "ok" if max(processing) < TARGET_PICKUP_S else "OVER"
            print(f"  {name:6} claimed median {statistics.median(claimed):5.2f} s, max {max(claimed):5.2f} s; "
                  f"processing median {statistics.median(processing):5.2f} s, max {max(processing):5.2f} s  "
                  f"({', '.join(f'{c:.2f}/{p:.2f}' for c, p in values)})  {verdict}", flush=True)
        # Each side's processes: the local server's tree; for Ray, everything else this script started (the
        # cluster's daemons and workers, the Ray server's tree).
        local_tree = lambda: tree(local.server.proc.pid)  # noqa: E731
        everything = lambda: tree(os.getpid())[1:]  # noqa: E731

        def ray_side() -> list:
            local_pids = {p.pid for p in local_tree()}
            return [p for p in everything() if p.pid not in local_pids]

        longs: dict[str, list[dict[str, float]]] = {s.name: [] for s in sides}
        for _ in range(args.long_repeats):
            for side, processes in ((local, local_tree), (ray, ray_side)):
                time.sleep(args.idle)
                longs[side.name].append(side.long(args.long_steps, processes))
        median = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in longs.items()}
        overhead = median["ray"]["wall_s"] / median["local"]["wall_s"] - 1
        overhead_cpu = median["ray"]["cpu_s"] / median["local"]["cpu_s"] - 1
        print(f"\noverhead: a training of {args.long_steps} steps, {args.long_repeats} each, alternating (target "
              f"{TARGET_OVERHEAD:.0%}); CPU s: all of the side's processes meanwhile (training: its process alone)")
        for name, runs in longs.items():
            print(f"  {name:6} " + "; ".join(f"wall {r['wall_s']:.1f} s (loop {r['loop_s']:.1f}), CPU "
                                             f"{r['cpu_s']:.1f} s (training {r['training_cpu_s']:.1f})" for r in runs))
        print(f"  ray / local - 1: wall {overhead:+.1%}, CPU {overhead_cpu:+.1%} (medians)  "
              f"{'ok' if max(overhead, overhead_cpu) < TARGET_OVERHEAD else 'OVER'}", flush=True)
        time.sleep(args.idle)
        loss = node_loss(ray, cluster)
        checks = "fast (~2 s)" if args.fast_health_checks else "Ray's defaults"
        print(f"\nnode loss ({checks} health checks): node {loss['lost']} killed after checkpoint; detected "
              f"{loss['detected_s']:.1f} s, resumed on node {loss['moved_to']} from step {loss['from_step']} "
              f"{loss['resumed_s']:.1f} s after the kill", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"cpu": cpu_name(), "pickups": pickups, "long": longs,
                                             "overhead_wall": overhead, "overhead_cpu": overhead_cpu,
                                             "node_loss": loss,
                                             "fast_health_checks": args.fast_health_checks}, indent=2))
        return 0
    finally:
        for side in sides:
            side.server.stop()
        if cluster is not None:
            cluster.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
