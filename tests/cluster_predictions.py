"""The prediction scenarios of tests/cluster_scenarios.py: ``finetune serve --predict-executor ray``, inference
workers as Ray actors on the worker nodes (two actors, ``predictor=1`` each of the nodes' ``predictor: 2``).

Not collected by pytest (tests/test_cluster.py runs them through tests/cluster_scenarios.py).
"""

from __future__ import annotations

import time
from typing import Any

from cluster_harness import refusal_of_node_without_registry

FINAL = ("succeeded", "failed", "canceled")
# --predict-max-batch 1: a second prediction for a busy actor's version waits (admitted, not started) behind the
# first, so that a lost node has one of each.
PREDICT = ("--predict-executor", "ray", "--predict-workers", "2", "--predict-cpus", "0",
           "--predict-ray-resource", "predictor=1", "--predict-max-batch", "1", "--predict-threads", "1")


def _predict_server(w: Any) -> None:
    """The world's server, restarted with inference on Ray (once), with both actors ready on two worker nodes
    (scenarios before these may have killed some)."""
    if tuple(w.server.options[-len(PREDICT):]) != PREDICT:
        while len(w.cluster.worker_ids()) < 2:
            w.cluster.add_worker()
        w.restart_server(*PREDICT)
    deadline = time.monotonic() + 240
    while sum("inference worker" in line and "ready on" in line for line in _since_start(w)) < 2:
        assert time.monotonic() < deadline, f"the inference actors did not start:\n{w.server.output()[-3000:]}"
        time.sleep(0.5)


def _since_start(w: Any) -> list[str]:
    lines = w.server.output().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("finetune: serving ")]
    return lines[starts[-1]:] if starts else lines


def _base(w: Any, name: str, **sizes: Any) -> str:
    """A base version ``base/NAME`` (a tiny model of its own with ``sizes``); its version id."""
    from finetune.errors import NotFoundError
    from finetune.registry.sources import import_base
    from finetune.tiny import build_tiny_model

    try:
        return w.reg.resolve(f"base/{name}:1").id
    except NotFoundError:
        pass
    folder = build_tiny_model(w.workdir / f"tiny-{name}", hidden_size=64, num_layers=2, num_heads=4, **sizes)
    return import_base(w.reg, f"base/{name}", str(folder), visibility="public").id


def _http(w: Any):
    import httpx

    return httpx.Client(base_url=w.server.url, headers={"Authorization": f"Bearer {w.token}"}, timeout=120)


def _create(w: Any, version: str, wait: bool = True, **input: Any) -> dict[str, Any]:
    headers = {"Prefer": "wait=60"} if wait else {}
    with _http(w) as http:
        answer = http.post("/v1/predictions", json={"version": version, "input": {"prompt": "Hello", **input}},
                           headers=headers)
    assert answer.status_code == 201, answer.text
    return answer.json()


def _get(w: Any, prediction_id: str) -> dict[str, Any]:
    with _http(w) as http:
        return http.get(f"/v1/predictions/{prediction_id}").json()


def _until(w: Any, prediction_id: str, check: Any, timeout_s: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        shown = _get(w, prediction_id)
        if check(shown):
            return shown
        assert time.monotonic() < deadline, f"{prediction_id}: {what} not after {timeout_s:.0f} s: {shown}"
        time.sleep(0.1)


def predict_nodes(w: Any) -> dict[str, Any]:
    """Predictions answered by actors on both worker nodes: two versions go to two actors (the least loaded);
    a version again goes to the actor that holds it loaded; Prefer: wait, streaming and cancel as locally."""
    _predict_server(w)
    y = _base(w, "y")
    first = _create(w, w.base_id, max_new_tokens=8)
    assert first["status"] == "succeeded", first
    second = _create(w, y, max_new_tokens=8)
    assert second["status"] == "succeeded", second
    workers = set(w.cluster.worker_ids())
    assert len(workers) == 2, workers
    ran_on = {first["placement"]["node_id"], second["placement"]["node_id"]}
    assert ran_on == workers, (first["placement"], second["placement"], workers)
    asked = time.monotonic()
    again = _create(w, w.base_id, max_new_tokens=8)
    warm_s = time.monotonic() - asked
    assert again["placement"]["actor"] == first["placement"]["actor"], (again["placement"], first["placement"])
    assert again["output"] == first["output"]  # greedy: the same answer from the same (warm) version
    # The server's log names each actor's node.
    ready = [line for line in _since_start(w) if "inference worker" in line and "ready on" in line]
    assert {n[:8] for n in workers} == {line.split("ready on node ")[1][:8] for line in ready}, ready
    # Streaming through the official client: the same text the record keeps.
    pieces = [str(e) for e in w.client.stream(f"base/y:{y}", input={"prompt": "Hello", "max_new_tokens": 8})]
    assert "".join(pieces) == "".join(second["output"]), (pieces, second["output"])
    # Cancel reaches the actor: a long prediction ends canceled within seconds.
    long = _base(w, "long", max_position_embeddings=8192)
    started = _create(w, long, wait=False, max_new_tokens=8000)
    _until(w, started["id"], lambda p: p["status"] == "processing" and p["output"], 180, "streaming")
    asked = time.monotonic()
    with _http(w) as http:
        canceled = http.post(f"/v1/predictions/{started['id']}/cancel").json()
    took = time.monotonic() - asked
    assert canceled["status"] == "canceled" and took < 10, (canceled["status"], took)
    return {"nodes": sorted(n[:8] for n in ran_on), "cancel_s": round(took, 2), "warm_8_tokens_s": round(warm_s, 3),
            "predict_time_s": again["metrics"].get("predict_time")}


def predict_node_lost(w: Any) -> dict[str, Any]:
    """A node killed under a running prediction: it fails naming the node; one waiting behind it on that actor
    moves to another and succeeds; new predictions succeed; a new actor replaces the lost one."""
    _predict_server(w)
    long = _base(w, "long", max_position_embeddings=8192)
    running = _create(w, long, wait=False, max_new_tokens=8000)
    running = _until(w, running["id"], lambda p: p["status"] == "processing" and p["output"], 180, "streaming")
    victim = running["placement"]["node_id"]
    waiting = _create(w, long, wait=False, max_new_tokens=8)  # the version is warm there: it queues behind
    waiting = _until(w, waiting["id"], lambda p: p["placement"], 60, "admitted")
    assert waiting["placement"]["node_id"] == victim and waiting["status"] == "starting", waiting
    assert _get(w, running["id"])["status"] == "processing"  # still decoding when its node goes
    killed_at = time.monotonic()
    w.cluster.kill(victim)
    failed = _until(w, running["id"], lambda p: p["status"] in FINAL, 120, "ended")
    detected_s = time.monotonic() - killed_at
    assert failed["status"] == "failed", failed
    assert f"node {victim[:8]}" in failed["error"] and "lost" in failed["error"], failed["error"]
    moved = _until(w, waiting["id"], lambda p: p["status"] in FINAL, 180, "ended")
    assert moved["status"] == "succeeded", moved
    assert moved["placement"]["node_id"] != victim and "moved to another worker" in moved["logs"], moved
    after = _create(w, w.base_id, max_new_tokens=8)
    assert after["status"] == "succeeded" and after["placement"]["node_id"] != victim, after
    lost = next(line for line in _since_start(w) if "lost (" in line and "inference worker" in line)
    assert f"node {victim[:8]}" in lost and "1 running prediction(s) failed, 1 moved" in lost, lost
    # The replacement: a third actor ready, on a node still alive.
    deadline = time.monotonic() + 180
    while True:
        ready = [line for line in _since_start(w) if "inference worker" in line and "ready on" in line]
        if len(ready) >= 3:
            break
        assert time.monotonic() < deadline, f"no new inference worker:\n{w.server.output()[-3000:]}"
        time.sleep(0.5)
    assert victim[:8] not in ready[2], ready
    w.cluster.add_worker()  # for the scenarios after this one
    return {"failed_after_s": round(detected_s, 1), "error": failed["error"], "replacement": ready[2]}


def predict_unseen_registry(w: Any) -> dict[str, Any]:
    """A node joining with another folder at the registry's path is refused for inference by name (no inference
    actor is placed there), as for trainings."""
    _predict_server(w)
    line = refusal_of_node_without_registry(w.cluster.address, w.root, w.workdir, w.server, "no inference runs there")
    return {"line": line}


def predict_no_room(w: Any) -> dict[str, Any]:
    """Inference actors no node can hold (more ``predictor`` than any node has): the server says so at start,
    and a prediction is refused at once (503, saying what the actors ask for) instead of waiting."""
    asks = tuple("predictor=3" if o == "predictor=1" else o for o in PREDICT)
    w.restart_server(*asks)
    line = w.server.wait_output("no node of the Ray cluster can hold an inference worker", 120)
    assert "predictor 3" in line, line
    with _http(w) as http:
        answer = http.post("/v1/predictions", json={"version": w.base_id, "input": {"prompt": "Hello"}},
                           headers={"Prefer": "wait=60"})
    assert answer.status_code == 503, answer.text
    detail = answer.json()["detail"]
    assert "no node of the Ray cluster can hold an inference worker (predictor 3 each)" in detail, detail
    assert "--predict-ray-resource" in detail, detail
    return {"detail": detail}
