"""Trainings on a real Ray cluster: a head and two worker nodes on this machine, in a network namespace of their
own (Ray takes the machine's address otherwise; there, only loopback exists), the official ``replicate``
client against ``finetune serve --executor ray``.

The scenarios live in tests/cluster_scenarios.py and run in one process inside the namespace, over one
cluster (starting one takes ~20 s on 2 cores); each test here is one scenario's verdict, with its assertion and
traceback when it failed. Selecting tests (``-k``) runs only the selected scenarios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_harness import netns_available, run_in_netns  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "cluster_scenarios.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def verdicts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("ray", reason="the cluster tests need Ray: pip install 'finetune[ray]'")
    reason = netns_available()
    if reason is not None:
        pytest.skip(f"the cluster tests run Ray in a network namespace of its own: {reason}")
    here = request.module.__name__
    selected = [item.name.removeprefix("test_") for item in request.session.items if item.module.__name__ == here]
    workdir = tmp_path_factory.mktemp("cluster")
    results, log = workdir / "results.json", workdir / "scenarios.log"
    proc = run_in_netns([str(SCRIPT), "--workdir", str(workdir), "--results", str(results), *selected],
                        timeout_s=1500, log=log)
    found = json.loads(results.read_text()) if results.exists() else {}
    found["_log"] = log.read_text(errors="replace")[-4000:]
    found["_returncode"] = proc.returncode
    return found


def _verdict(verdicts: dict, name: str) -> dict:
    setup = verdicts.get("_setup")
    if setup is not None:
        pytest.fail(f"the cluster did not start:\n{setup['error']}")
    result = verdicts.get(name)
    assert result is not None, f"scenario {name} did not run (exit {verdicts['_returncode']}):\n{verdicts['_log']}"
    assert result["ok"], result["error"]
    return result["facts"]


def test_four_trainings(verdicts: dict) -> None:
    """Four trainings into one destination run on both workers (their records name the nodes) and publish four
    versions; the API's training object shows where each ran."""
    _verdict(verdicts, "four_trainings")


def test_two_processes(verdicts: dict) -> None:
    """``train.processes: 2``: a Ray Train TorchTrainer over both worker nodes (gloo on CPU) publishes one
    version whose adapter matches one process with grad_accum 2 (the same global batch) within 1e-5."""
    _verdict(verdicts, "two_processes")


def test_cancel_remote(verdicts: dict) -> None:
    """Cancel reaches a training running on a worker node within seconds, and one canceled before its run
    claimed its record; nothing is published."""
    _verdict(verdicts, "cancel_remote")


def test_node_lost(verdicts: dict) -> None:
    """A worker node killed mid-training: the training continues on another node from its newest checkpoint
    (the log says from which node to which, from which step) and publishes exactly one version."""
    _verdict(verdicts, "node_lost")


def test_restart_reattach(verdicts: dict) -> None:
    """A server restart re-attaches to the training still running in the cluster (one attempt, same actor);
    with --max-retries 0 its node's loss then fails it, naming the node, nothing published."""
    _verdict(verdicts, "restart_reattach")


def test_no_room(verdicts: dict) -> None:
    """A training no node can hold (GPUs asked of a cluster without any) fails at once, saying what it asked."""
    _verdict(verdicts, "no_room")


def test_unseen_registry(verdicts: dict) -> None:
    """A node joining with another folder at the registry's path is refused by name, with the path."""
    _verdict(verdicts, "unseen_registry")


def test_predict_nodes(verdicts: dict) -> None:
    """``--predict-executor ray``: predictions of two versions are answered by actors on both worker nodes (the
    records and the server's log name the nodes); a version goes back to the actor holding it; Prefer: wait,
    streaming and cancel work as with local workers."""
    _verdict(verdicts, "predict_nodes")


def test_predict_node_lost(verdicts: dict) -> None:
    """A worker node killed under a running prediction: it fails naming the node, one waiting behind it on that
    actor moves to another and succeeds, new predictions succeed, and a new actor replaces the lost one."""
    _verdict(verdicts, "predict_node_lost")


def test_predict_unseen_registry(verdicts: dict) -> None:
    """A node joining with another folder at the registry's path is refused for inference actors, by name."""
    _verdict(verdicts, "predict_unseen_registry")


def test_predict_no_room(verdicts: dict) -> None:
    """Inference actors no node can hold: the server says so, and a prediction is a 503 saying what they ask."""
    _verdict(verdicts, "predict_no_room")
