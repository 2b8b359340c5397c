"""The Ray cluster scenarios of tests/test_cluster.py, run in one network namespace over one cluster.

    python tests/cluster_scenarios.py --workdir DIR --results FILE [SCENARIO ...]   (through run_in_netns)

One head and two worker nodes (tests/cluster_harness.py), one registry, ``finetune serve --executor ray``
driven through the official ``replicate`` client. Scenarios run in the order of :data:`ORDER` (a later one may
rely on what an earlier one did to the cluster: a killed node is replaced by a new one); each writes its result
(``ok``, the assertion that failed, and the figures it saw) into the results file as soon as it ends.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_harness import (  # noqa: E402
    Server,
    quiet_environment,
    refusal_of_node_without_registry,
    write_json,
)
from cluster_predictions import (  # noqa: E402
    predict_no_room,
    predict_node_lost,
    predict_nodes,
    predict_unseen_registry,
)

from finetune.cluster.local import LocalCluster, check_loopback_only  # noqa: E402

FINAL = ("succeeded", "failed", "canceled")
SHORT = {"train.max_steps": 2, "train.batch_size": 4}
LONG = {"train.max_steps": 100_000, "train.batch_size": 4}  # runs until canceled or killed
# The two-process run against one process with the same global batch (as tests/test_distributed.py).
PAIR = {"data": {"eval": 0.1, "max_seq_len": 256}, "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 3, "grad_accum": 1, "lr": 2e-3, "eval_every": 2,
                  "checkpoint_every": 2, "precision": "fp32"}}


class World:
    """The registry, the cluster and the server every scenario works with."""

    def __init__(self, workdir: Path):
        import replicate

        from finetune.registry import Registry
        from finetune.registry.accounts import Accounts
        from finetune.registry.sources import import_base
        from finetune.tiny import build_tiny_model, sample_data_path

        os.environ["FINETUNE_FSYNC"] = "0"
        self.workdir = workdir
        self.root = workdir / "registry"
        self.reg = Registry(self.root)
        self.data = sample_data_path()
        model_dir = build_tiny_model(workdir / "tiny", hidden_size=64, num_layers=2, num_heads=4)
        self.base_id = import_base(self.reg, "base/x", str(model_dir), visibility="public").id
        self.token = Accounts(self.reg).create_token("alice", label="tests")
        self.cluster = LocalCluster(workers=2)
        self.server = self.new_server().start()
        self.client = replicate.Client(api_token=self.token, base_url=self.server.url)

    def new_server(self, *options: str) -> Server:
        return Server(self.root, self.cluster.address, self.workdir / "server.log", "--ray-resource", "worker=1",
                      "--allow-data-dir", str(self.data.parent), *options)

    def restart_server(self, *options: str) -> None:
        import replicate

        self.server.stop()
        self.server = self.new_server(*options).start()
        self.client = replicate.Client(api_token=self.token, base_url=self.server.url)

    def create_model(self, name: str) -> str:
        self.client.models.create("alice", name, visibility="private", hardware="cpu")
        return f"alice/{name}"

    def train(self, destination: str, input: dict[str, Any]) -> str:
        data = {"path": str(self.data), "max_seq_len": 128, **input.pop("data", {})}
        t = self.client.trainings.create(version=f"base/x:{self.base_id}", destination=destination,
                                         input={**input, "data": data})
        return t.id

    def record(self, training_id: str):
        from finetune.registry.jobs import Trainings

        return Trainings(self.reg).get(training_id)

    def log(self, training_id: str) -> str:
        path = self.reg.training_paths(training_id).log
        return path.read_text() if path.exists() else ""

    def wait(self, training_id: str, statuses: tuple[str, ...], timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while True:
            record = self.record(training_id)
            if str(record.status) in statuses:
                return record
            assert time.monotonic() < deadline, \
                f"{training_id} still {record.status} after {timeout_s:.0f} s:\n{self.log(training_id)[-2000:]}"
            time.sleep(0.2)

    def wait_step(self, training_id: str, step: int, timeout_s: float) -> None:
        """Until the run has logged ``step`` (and, with ``checkpoint``, saved a checkpoint of it or later)."""
        deadline = time.monotonic() + timeout_s
        while _last_step(self, training_id) < step:
            assert time.monotonic() < deadline, f"no step {step} yet:\n{self.log(training_id)[-2000:]}"
            assert str(self.record(training_id).status) not in FINAL, self.record(training_id)
            time.sleep(0.1)

    def wait_checkpoint(self, training_id: str, step: int, timeout_s: float) -> None:
        """Until the run has a checkpoint of ``step`` or later."""
        from finetune.training.checkpoint import checkpoints

        folder = self.reg.training_paths(training_id).checkpoints
        deadline = time.monotonic() + timeout_s
        while not any(int(p.name.split("-")[1]) >= step for p in checkpoints(folder)):
            assert time.monotonic() < deadline, f"no checkpoint of step {step}:\n{self.log(training_id)[-2000:]}"
            assert str(self.record(training_id).status) not in FINAL, self.record(training_id)
            time.sleep(0.1)

    def cancel_leftovers(self) -> None:
        """Cancel what a failed scenario left running, so that the next one finds the workers free."""
        from finetune.registry.jobs import Trainings

        for record in Trainings(self.reg).list():
            if str(record.status) not in FINAL:
                try:
                    self.client.trainings.cancel(record.id)
                    self.wait(record.id, FINAL, 60)
                except Exception:
                    pass

    def versions(self, model: str) -> list:
        return self.reg.list_versions(model)


# ---------------------------------------------------------------- scenarios
def four_trainings(w: World) -> dict[str, Any]:
    dest = w.create_model("four")
    ids = [w.train(dest, {**SHORT, "train.seed": seed}) for seed in range(4)]
    records = [w.wait(i, FINAL, 300) for i in ids]
    assert [str(r.status) for r in records] == ["succeeded"] * 4, [(r.status, r.error) for r in records]
    nodes = {r.placement["node_id"] for r in records}
    assert nodes == set(w.cluster.worker_ids()), (nodes, w.cluster.worker_ids())
    assert all(r.placement["attempts"] == 1 and r.placement["host"] for r in records)
    assert len(w.versions(dest)) == 4
    # The API shows where each ran too.
    import httpx

    shown = httpx.get(f"{w.server.url}/v1/trainings/{ids[0]}", headers={"Authorization": f"Bearer {w.token}"}).json()
    assert shown["placement"]["node_id"] == records[0].placement["node_id"]
    return {"nodes": sorted(n[:8] for n in nodes)}


def two_processes(w: World) -> dict[str, Any]:
    import yaml
    from safetensors.torch import load_file

    dest = w.create_model("two")
    pair = {"data": dict(PAIR["data"]), "lora": PAIR["lora"], "train": {**PAIR["train"], "processes": 2}}
    training_id = w.train(dest, pair)
    record = w.wait(training_id, FINAL, 400)
    assert str(record.status) == "succeeded", (record.error, w.log(training_id)[-2000:])
    assert {n["node_id"] for n in record.placement["nodes"]} == set(w.cluster.worker_ids()), record.placement
    assert "(2 processes, cpu, fp32)" in w.log(training_id)
    assert [v.number for v in w.versions(dest)] == [1]
    # The same windows in one process: grad_accum 2 instead of 2 processes (tests/test_distributed.py).
    config = w.workdir / "one.yaml"
    config.write_text(yaml.safe_dump({"base_model": "base/x:1", "data": {"path": str(w.data), **PAIR["data"]},
                                      "lora": PAIR["lora"], "train": {**PAIR["train"], "grad_accum": 2}}))
    proc = subprocess.run([sys.executable, "-m", "finetune", "--registry", str(w.root), "train", str(config),
                           "--destination", "alice/one", "--create-destination", "--quiet"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    two, one = w.reg.resolve(f"{dest}:1"), w.reg.resolve("alice/one:1")
    a, b = (load_file(str(v.path / "adapter_model.safetensors")) for v in (two, one))
    assert a.keys() == b.keys() and a
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    # All-reduce (gloo, two nodes) sums in another order than one process does: ~1e-7 on gradients, a little
    # more after Adam's division by their root mean square; the adapter's entries are ~1e-2.
    assert diff < 1e-5, diff
    assert max(float(t.abs().max()) for k, t in b.items() if "lora_B" in k) > 1e-3  # it did train
    assert abs(two.metadata["metrics"]["eval_loss"] - one.metadata["metrics"]["eval_loss"]) < 1e-5
    return {"max_abs_diff": diff}


def cancel_remote(w: World) -> dict[str, Any]:
    dest = w.create_model("cancel")
    training_id = w.train(dest, dict(LONG))
    record = w.wait(training_id, ("processing",), 180)
    assert record.placement["node_id"] in w.cluster.worker_ids()  # a worker node: the head has no CPUs
    w.wait_step(training_id, 1, 60)
    asked = time.monotonic()
    w.client.trainings.cancel(training_id)
    record = w.wait(training_id, FINAL, 60)
    took = time.monotonic() - asked
    assert str(record.status) == "canceled", (record.status, record.error)
    assert took < 20, took
    assert w.versions(dest) == []
    node = record.placement["node_id"][:8]
    # Canceled as soon as it is handed to an actor, before the run claimed its record (which clears an older
    # cancel marker): the actor keeps the marker in place, so the cancel is not lost.
    early = w.train(dest, dict(LONG))
    while not (w.record(early).placement or {}).get("actor"):
        time.sleep(0.02)
    w.client.trainings.cancel(early)
    record = w.wait(early, FINAL, 120)
    assert str(record.status) == "canceled", (record.status, record.error)
    assert w.versions(dest) == []
    return {"cancel_s": round(took, 2), "node": node}


def node_lost(w: World) -> dict[str, Any]:
    dest = w.create_model("lost")
    training_id = w.train(dest, {"train.max_steps": 150, "train.batch_size": 4, "train.checkpoint_every": 10})
    record = w.wait(training_id, ("processing",), 180)
    victim = record.placement["node_id"]
    w.wait_checkpoint(training_id, 10, 120)
    killed_at = time.monotonic()
    w.cluster.kill(victim)
    replacement = w.cluster.add_worker()  # for the next scenarios (and a place to continue if the other is busy)
    record = w.wait(training_id, FINAL, 400)
    log = w.log(training_id)
    assert str(record.status) == "succeeded", (record.error, log[-3000:])
    placement = record.placement
    assert placement["attempts"] == 2, placement
    assert [e["node_id"] for e in placement["lost"]] == [victim] and placement["lost"][0]["why"] == "node lost"
    assert placement["node_id"] != victim and placement["node_id"] in w.cluster.worker_ids()
    moved = next(line for line in log.splitlines() if "attempt 2 of 3 on" in line)
    assert f"node {placement['node_id'][:8]}" in moved and f"node {victim[:8]}" in moved, moved
    assert "continuing from its newest checkpoint, step " in moved, moved
    step = int(moved.rsplit("step ", 1)[1])
    assert step >= 10 and f"resumed from step-{step:08d} (step {step})" in log
    versions = w.versions(dest)
    assert len(versions) == 1 and versions[0].metadata["training_id"] == training_id
    return {"from_step": step, "moved": moved.split(" ", 2)[2], "recovered_s": round(time.monotonic() - killed_at, 1),
            "replacement": replacement.node_id[:8]}


def restart_reattach(w: World) -> dict[str, Any]:
    """A server restart re-attaches to the training still running in the cluster (never starts it twice); the
    new server, with --max-retries 0, then fails it at once when its node is lost, naming the node."""
    dest = w.create_model("restart")
    training_id = w.train(dest, dict(LONG))
    w.wait(training_id, ("processing",), 180)
    w.wait_step(training_id, 1, 60)
    before = w.record(training_id).placement
    w.restart_server("--max-retries", "0")
    line = w.server.wait_output(f"training {training_id} still runs on", 30)
    assert "re-attached" in line
    steps_after_restart = _last_step(w, training_id)
    w.wait_step(training_id, steps_after_restart + 1, 60)  # it goes on, watched by the new server
    record = w.record(training_id)
    assert str(record.status) == "processing" and record.placement["actor"] == before["actor"]
    assert record.placement["attempts"] == 1  # never started twice
    victim = record.placement["node_id"]
    w.cluster.kill(victim)
    record = w.wait(training_id, FINAL, 120)
    assert str(record.status) == "failed", (record.status, record.error)
    assert f"node {victim[:8]}" in record.error and "--max-retries 0" in record.error, record.error
    assert w.versions(dest) == []
    return {"steps_at_restart": steps_after_restart, "error": record.error}


def no_room(w: World) -> dict[str, Any]:
    """A training no node can ever hold (a gpu destination, a cluster without GPUs) fails at once, saying why,
    instead of waiting for ever."""
    w.client.models.create("alice", "gpu", visibility="private", hardware="gpu")
    training_id = w.train("alice/gpu", dict(SHORT))
    record = w.wait(training_id, FINAL, 30)
    assert str(record.status) == "failed" and "no room for this training" in record.error, record.error
    assert "GPU 1" in record.error, record.error
    return {"error": record.error}


def unseen_registry(w: World) -> dict[str, Any]:
    """A node whose registry path is an empty folder of its own (a mount namespace with a bind mount)."""
    line = refusal_of_node_without_registry(w.cluster.address, w.root, w.workdir, w.server, "refused:")
    return {"line": line}


def _last_step(w: World, training_id: str) -> int:
    from finetune.training.metrics import MetricsLog

    rows = MetricsLog(w.reg.training_paths(training_id).metrics).read()
    return max((r["step"] for r in rows), default=0)


# The prediction scenarios restart the server with inference on Ray: they come last.
ORDER = [four_trainings, two_processes, cancel_remote, node_lost, restart_reattach, no_room, unseen_registry,
         predict_nodes, predict_node_lost, predict_unseen_registry, predict_no_room]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("scenarios", nargs="*")
    args = parser.parse_args()
    check_loopback_only()
    quiet_environment()
    wanted = [s for s in ORDER if not args.scenarios or s.__name__ in args.scenarios]
    results: dict[str, Any] = {}
    started = time.monotonic()
    world = None
    try:
        world = World(args.workdir)
        results["_setup_s"] = round(time.monotonic() - started, 1)
        for scenario in wanted:
            began = time.monotonic()
            try:
                facts = scenario(world)
                results[scenario.__name__] = {"ok": True, "facts": facts}
            except BaseException:
                results[scenario.__name__] = {"ok": False, "error": traceback.format_exc()[-6000:]}
                world.cancel_leftovers()
            results[scenario.__name__]["seconds"] = round(time.monotonic() - began, 1)
            print(f"{scenario.__name__}: {results[scenario.__name__]}", flush=True)
            write_json(args.results, results)
    except BaseException:
        results["_setup"] = {"ok": False, "error": traceback.format_exc()[-6000:]}
        write_json(args.results, results)
    finally:
        if world is not None:
            world.server.stop()
            world.cluster.shutdown()
    write_json(args.results, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
