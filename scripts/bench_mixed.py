"""The mixed run of ``scripts/bench_api.py --mixed``: does one account's flood harm another account's work?

Three phases of at most ``seconds`` each against one server (loopback only). In each, the quiet account reads
(``GET`` of its model, ``READ_CLIENTS`` clients) and runs short predictions one after another (8 tokens, greedy,
``Prefer: wait``), bounded in count. In the second phase the flooding account meanwhile keeps ``FLOOD_CLIENTS``
clients creating long predictions without waiting (256 tokens each; past its per-account cap the server answers
429 and the client tries again after 0.1 s); in the third it also queues ``FLOOD_TRAININGS`` trainings. Printed:
the quiet account's p50/p99/max for each phase, and what the flood did (created, refused, trainings). After each
phase every prediction and training the flood left running is canceled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

READ_CLIENTS = 4
MAX_READS = 4000  # per phase, all clients together
MAX_PREDICTIONS = 40  # the quiet account's, per phase
FLOOD_CLIENTS = 8
FLOOD_TRAININGS = 3
QUIET_INPUT = {"prompt": "Name a color.", "max_new_tokens": 8, "temperature": 0}
FLOOD_INPUT = {"prompt": "Once upon a time", "max_new_tokens": 256}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def _seconds(start: str, end: str) -> float:
    import datetime as dt

    a, b = (dt.datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (start, end))
    return (b - a).total_seconds()


def _loop(call: Callable[[], None], until: float, budget: list[int], out: list[float], lock: threading.Lock,
          errors: list[str]) -> None:
    while time.monotonic() < until:
        with lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        t0 = time.perf_counter()
        try:
            call()
        except Exception as err:  # reported with the figures: a failed call is not a fast one
            with lock:
                errors.append(f"{type(err).__name__}: {err}"[:200])
            return
        with lock:
            out.append((time.perf_counter() - t0) * 1e3)


def mixed_run(url: str, quiet_token: str, flood_token: str, base_id: str, read_path: str, data: str,
              seconds: float) -> None:
    quiet = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {quiet_token}"}, timeout=120)
    flood = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {flood_token}"}, timeout=120,
                         limits=httpx.Limits(max_connections=FLOOD_CLIENTS + 4))

    def read() -> None:
        quiet.get(read_path).raise_for_status()

    stages: list[tuple[float, float]] = []  # (queued: created -> started, running: predict_time), seconds

    def predict() -> None:
        r = quiet.post("/v1/predictions", json={"version": base_id, "input": QUIET_INPUT},
                       headers={"Prefer": "wait=60"})
        r.raise_for_status()
        body = r.json()
        if body["status"] != "succeeded":
            raise RuntimeError(f"prediction {body['id']} {body['status']}: {body.get('error')}")
        stages.append((_seconds(body["created_at"], body["started_at"]), body["metrics"].get("predict_time", 0.0)))

    print(f"\nmixed: account 'bench' reads {read_path} ({READ_CLIENTS} clients) and runs "
          f"{QUIET_INPUT['max_new_tokens']}-token predictions one after another; phases of at most {seconds:.0f} s, "
          f"{MAX_READS} reads and {MAX_PREDICTIONS} predictions")
    print(f"{'phase':34} {'what':12} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}   the flood")
    predict()  # the worker loads the base once, outside the figures
    for phase, with_trainings in (("alone", False), ("flood: predictions", False),
                                  ("flood: predictions, trainings", True)):
        stop = threading.Event()
        counts = {"created": 0, "refused": 0, "other": 0}
        flood_threads: list[threading.Thread] = []
        trainings: list[str] = []
        body = {"destination": "flood/trained",
                "input": {"data": {"path": data, "max_seq_len": 128}, "train.max_steps": 30, "train.batch_size": 4}}
        for _ in range(FLOOD_TRAININGS if with_trainings else 0):
            r = flood.post(f"/v1/models/base/tiny/versions/{base_id}/trainings", json=body)
            if r.status_code == 201:
                trainings.append(r.json()["id"])
            else:
                counts["other"] += 1
        if phase != "alone":
            def flood_predictions() -> None:
                while not stop.is_set():
                    try:
                        r = flood.post("/v1/predictions", json={"version": base_id, "input": FLOOD_INPUT})
                    except httpx.HTTPError:
                        counts["other"] += 1
                        continue
                    key = "created" if r.status_code == 201 else "refused" if r.status_code == 429 else "other"
                    counts[key] += 1
                    if key != "created":
                        stop.wait(0.1)

            flood_threads = [threading.Thread(target=flood_predictions, daemon=True) for _ in range(FLOOD_CLIENTS)]
            for t in flood_threads:
                t.start()
            time.sleep(2.0)  # the flood is at its cap before the quiet account's figures begin
        until = time.monotonic() + seconds
        lock = threading.Lock()
        errors: list[str] = []
        reads: list[float] = []
        predictions: list[float] = []
        read_budget, predict_budget = [MAX_READS], [MAX_PREDICTIONS]
        stages.clear()
        workers = [threading.Thread(target=_loop, args=(read, until, read_budget, reads, lock, errors))
                   for _ in range(READ_CLIENTS)]
        workers.append(threading.Thread(target=_loop, args=(predict, until, predict_budget, predictions, lock,
                                                            errors)))
        t0 = time.monotonic()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        wall = time.monotonic() - t0
        stop.set()
        for t in flood_threads:
            t.join(timeout=30)
        flood_note = (f"{counts['created']} predictions created, {counts['refused']} refused (429), "
                      f"{len(trainings)} trainings queued" if phase != "alone" else "none")
        label = f"{phase} ({wall:.0f} s)"
        for what, values in (("reads", reads), ("predictions", predictions)):
            print(f"{label:34} {what:12} {len(values):5d} {_percentile(values, 0.5):9.1f} "
                  f"{_percentile(values, 0.99):9.1f} {max(values, default=float('nan')):9.1f}   {flood_note}")
            label, flood_note = "", ""
        if stages:
            queued, running = (sorted(x) for x in zip(*stages))
            print(f"{'':34} {'':12} {'':5} predictions' median: {queued[len(queued) // 2] * 1e3:.0f} ms from create "
                  f"to start, {running[len(running) // 2] * 1e3:.0f} ms running (the rest: HTTP, admission)")
        if errors:
            print(f"  errors: {len(errors)}, first: {errors[0]}")
        _clean_up(flood, trainings)


def _clean_up(flood: httpx.Client, trainings: list[str]) -> None:
    """Cancel what the flood left running (bounded: one page of predictions, the trainings it queued)."""
    for p in flood.get("/v1/predictions").json().get("results", []):
        if p["status"] in ("starting", "processing"):
            flood.post(f"/v1/predictions/{p['id']}/cancel")
    for training_id in trainings:
        flood.post(f"/v1/trainings/{training_id}/cancel")
