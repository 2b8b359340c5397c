#!/usr/bin/env python
"""Benchmark the HTTP API: read latency under concurrency, and how fast the queue picks up a training.

    python scripts/bench_api.py                      # 1,000 versions, 2,000 requests per read at concurrency 16
    python scripts/bench_api.py --versions 200 --requests 500 --trainings 2     # a quick look
    python scripts/bench_api.py --mixed              # one account floods, another's p99 alone and under it

It builds a temporary registry (fsync off while publishing: FINETUNE_FSYNC=0, benchmark only) holding a model
with ``--versions`` versions and the tiny random base model, starts ``finetune serve`` in its own process with
one worker, and measures from this process:

- reads: ``GET /v1/models/{o}/{n}`` and ``GET /v1/models/{o}/{n}/versions`` (the first page), each
  ``--requests`` times from ``--concurrency`` clients with a keep-alive connection each, first with raw httpx,
  then through the official ``replicate`` client (``models.get``, ``versions.list``); p50/p99/max latency,
  throughput and the server process's CPU time per request. The clients are separate processes by default, as
  separate users would be; ``--clients threads`` runs them as threads of one process instead, where the
  client's own work (the replicate client decodes and validates a 50-version page in ~1.7 ms) queues on that
  process's GIL and dominates the tail. Beside them, the same registry work done in-process without HTTP.
- pick-up: ``--trainings`` trainings of 2 steps, one at a time on an idle queue: the time from ``POST
  .../trainings`` until a worker holds the record (its pid is in it) and until the training is ``processing``
  (the model and data are loaded and the first step begins), raw and through the client.

Targets (issue 11): p99 under 50 ms for the reads; pick-up under 1 s. The load generator runs on the same
machine as the server, so on a small machine the two compete for the cores: say so with the figures.

``--mixed`` measures instead what one account's flood does to another account (scripts/bench_mixed.py): the
quiet account's reads and short predictions, alone and then while the flooding account keeps as many long
predictions running as the server lets it (refused past ``--predict-max-per-account`` with 429, and trying
again) and has trainings queued and running. Bounded: ``--mixed-seconds`` for each phase at most, loopback only.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

TARGET_READ_P99_MS = 50.0
TARGET_PICKUP_S = 1.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", type=int, default=1000, help="versions in the read model (default: 1000)")
    p.add_argument("--requests", type=int, default=2000, help="requests per read case (default: 2000)")
    p.add_argument("--concurrency", type=int, default=16, help="client threads (default: 16)")
    p.add_argument("--trainings", type=int, default=5, help="trainings timed per way (default: 5)")
    p.add_argument("--clients", choices=("processes", "threads"), default="processes",
                   help="run the concurrent clients as processes (default: like separate users) or as threads "
                        "of this process (their own GIL then queues them)")
    p.add_argument("--mixed", action="store_true",
                   help="instead: one account floods predictions and trainings; another's p99 alone and under it")
    p.add_argument("--mixed-seconds", type=float, default=60.0,
                   help="the longest each phase of --mixed lasts (default: 60)")
    p.add_argument("--predict-max-per-account", type=int, default=None, metavar="N",
                   help="passed to finetune serve (default: the server's own default)")
    p.add_argument("--predict-threads", type=int, default=None, metavar="N",
                   help="passed to finetune serve (default: the server's own default)")
    p.add_argument("--keep", action="store_true", help="keep the temporary registry")
    args = p.parse_args(argv)
    if min(args.versions, args.requests, args.concurrency) < 1 or args.trainings < 0:
        p.error("--versions, --requests and --concurrency must be at least 1")
    return args


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


def _summary(latencies: list[float], wall: float, cpu: float) -> dict[str, float]:
    """Latency percentiles (ms), throughput, and ``cpu`` seconds (the server's) as ms per request."""
    latencies = sorted(latencies)
    return {"p50": _percentile(latencies, 0.50), "p99": _percentile(latencies, 0.99), "max": latencies[-1],
            "rps": len(latencies) / wall, "n": len(latencies), "server_ms": cpu * 1e3 / len(latencies)}


def _no_clock() -> float:
    return 0.0


def _load(calls: list[Callable[[], object]], requests: int,
          cpu_clock: Callable[[], float] = _no_clock) -> dict[str, float]:
    """Run ``requests`` calls from one thread per entry of ``calls`` (each its own client); latencies in ms.
    ``cpu_clock`` is read before and after (the server's CPU seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    left = [requests]
    errors: list[BaseException] = []

    def worker(call: Callable[[], object]) -> None:
        mine = []
        while True:
            with lock:
                if left[0] <= 0 or errors:
                    break
                left[0] -= 1
            t0 = time.perf_counter()
            try:
                call()
            except BaseException as err:  # report the first failure instead of a half-measured figure
                with lock:
                    errors.append(err)
                break
            mine.append((time.perf_counter() - t0) * 1e3)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(call,)) for call in calls]
    cpu0, t0 = cpu_clock(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return _summary(latencies, wall, cpu_clock() - cpu0)


def _client_process(make: Callable[[], Callable[[], object]], warmup: int, requests: int, barrier, results) -> None:
    try:
        call = make()
        for _ in range(warmup):
            call()
        mine = []
        barrier.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            call()
            mine.append((time.perf_counter() - t0) * 1e3)
        results.put(mine)
    except BaseException as err:  # the parent reports it instead of a half-measured figure
        barrier.abort()
        results.put(repr(err))


def _load_processes(make: Callable[[], Callable[[], object]], clients: int, requests: int, warmup: int,
                    cpu_clock: Callable[[], float] = _no_clock) -> dict[str, float]:
    """``requests`` calls from ``clients`` processes (one client each, as separate users would be), all
    started together after ``warmup`` calls of their own; ``cpu_clock`` is read as the timed calls begin and
    after they end."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    procs = [ctx.Process(target=_client_process, args=(make, max(1, warmup // clients), n, barrier, results))
             for n in shares]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        raise SystemExit(f"a client process failed: {results.get(timeout=10)}") from None
    cpu0, t0 = cpu_clock(), time.perf_counter()
    latencies: list[float] = []
    for _ in procs:
        got = results.get(timeout=600)
        if isinstance(got, str):
            raise SystemExit(f"a client process failed: {got}")
        latencies.extend(got)
    wall = time.perf_counter() - t0
    cpu = cpu_clock() - cpu0
    for proc in procs:
        proc.join()
    return _summary(latencies, wall, cpu)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its threads, from ``/proc`` (Linux); 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _time_inprocess(fn: Callable[[], object], repeat: int = 50) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs) * 1e3


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    os.environ["FINETUNE_FSYNC"] = "0"  # the worker processes inherit it
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import httpx
    import replicate
    import torch
    from safetensors.torch import save_file
    from serve_process import start_server, stop_server

    from finetune.launch import free_port
    from finetune.registry import Registry
    from finetune.registry.accounts import Accounts
    from finetune.registry.jobs import Trainings
    from finetune.registry.sources import import_base
    from finetune.tiny import build_tiny_model, sample_data_path

    work = Path(tempfile.mkdtemp(prefix="bench-api-"))
    root = work / "registry"
    model = "bench/many"
    server = None
    try:
        # ---------------------------------------------------------------- the registry
        reg = Registry(root)
        reg.create_model(model, visibility="private", description="bench_api.py")
        src = work / "src"
        src.mkdir()
        (src / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
        t0 = time.perf_counter()
        for i in range(args.versions):
            # A real (tiny) safetensors file: the registry refuses anything else.
            save_file({"w": torch.full((16, 16), float(i))}, str(src / "adapter_model.safetensors"))
            reg.publish(model, src, parent={"hub_id": "bench/base", "revision": "0" * 40},
                        metadata={"metrics": {"train_loss": 1.0 / (i + 1)}})
        print(f"registry: {root}; {args.versions:,} versions of {model} published in "
              f"{time.perf_counter() - t0:.1f} s (fsync off)")
        tiny = build_tiny_model(work / "tiny", hidden_size=64, num_layers=2, num_heads=4)
        base = import_base(reg, "base/tiny", str(tiny), visibility="public")
        reg.create_model("bench/trained", visibility="private")
        token = Accounts(reg).create_token("bench", label="bench_api")
        if args.mixed:
            reg.create_model("flood/trained", visibility="private")
            flood_token = Accounts(reg).create_token("flood", label="bench_api")

        # ---------------------------------------------------------------- the server, in its own process
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "finetune", "--registry", str(root), "serve", "--port", str(port),
               "--workers", "1", "--allow-data-dir", str(sample_data_path().parent)]
        for flag in ("predict_max_per_account", "predict_threads"):
            if getattr(args, flag) is not None:
                cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        t0 = time.perf_counter()
        headers = {"Authorization": f"Bearer {token}"}
        server = start_server(cmd, url, work / "serve.log", probe="/v1/account", headers=headers, timeout_s=60,
                              interval_s=0.05, output="errors")
        print(f"server: {' '.join(cmd[1:4])} ... serve --workers 1 answered after {time.perf_counter() - t0:.2f} s")
        print(f"machine: {os.cpu_count()} CPUs, shared by the server, its worker and this load generator")
        time.sleep(15)  # the queue's spare worker imports torch when the server starts: not during the reads
        if args.mixed:
            from bench_mixed import mixed_run

            mixed_run(url, quiet_token=token, flood_token=flood_token, base_id=base.id, read_path=f"/v1/models/{model}",
                      data=str(sample_data_path()), seconds=args.mixed_seconds)
            return 0

        # ---------------------------------------------------------------- reads
        owner, name = model.split("/")

        def raw(path: str) -> Callable[[], Callable[[], object]]:
            def make() -> Callable[[], object]:
                client = httpx.Client(base_url=url, headers=headers, timeout=30)

                def call() -> object:
                    r = client.get(path)
                    r.raise_for_status()
                    return r.content
                return call
            return make

        def via_client(kind: str) -> Callable[[], Callable[[], object]]:
            def make() -> Callable[[], object]:
                client = replicate.Client(api_token=token, base_url=url)
                if kind == "get":
                    return lambda: client.models.get(model)
                m = client.models.get(model)
                return lambda: m.versions.list()
            return make

        cases = [
            (f"GET /v1/models/{owner}/{name}", "httpx", raw(f"/v1/models/{owner}/{name}")),
            (f"GET /v1/models/{owner}/{name}/versions", "httpx", raw(f"/v1/models/{owner}/{name}/versions")),
            ("models.get", "replicate", via_client("get")),
            ("models.get(...).versions.list()", "replicate", via_client("list")),
        ]
        page = httpx.get(f"{url}/v1/models/{owner}/{name}/versions", headers=headers).json()
        print(f"\nreads: {args.requests:,} requests each at concurrency {args.concurrency} ({args.concurrency} "
              f"client {args.clients}, after {min(200, args.requests)} warm-up), {args.versions:,} versions in the "
              f"model, {len(page['results'])} per page; server CPU: the server process's CPU time per request")
        print(f"{'':42} {'via':10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'req/s':>8} {'server CPU':>10}  "
              f"p99 / target   alone: p50 ms (one client, {min(200, args.requests)} requests)")
        warmup = min(200, args.requests)
        server_cpu = functools.partial(_cpu_seconds, server.pid)
        for label, via, make in cases:
            if args.clients == "processes":
                r = _load_processes(make, args.concurrency, args.requests, warmup, server_cpu)
            else:
                calls = [make() for _ in range(args.concurrency)]  # one client (keep-alive connection) per thread
                _load(calls, warmup)
                r = _load(calls, args.requests, server_cpu)
            one = make()
            _load([one], 20)
            alone = _load([one], warmup)  # one request at a time: the service time
            verdict = "ok" if r["p99"] < TARGET_READ_P99_MS else "OVER"
            print(f"{label:42} {via:10} {r['p50']:8.1f} {r['p99']:8.1f} {r['max']:8.1f} {r['rps']:8.0f} "
                  f"{r['server_ms']:7.2f} ms  "
                  f"x{r['p99'] / TARGET_READ_P99_MS:.2f} of {TARGET_READ_P99_MS:.0f} ms ({verdict})"
                  f"   {alone['p50']:.1f}")
        m = reg.get_model(model)
        floor_get = _time_inprocess(lambda: (reg.get_model(model), reg.latest(model).manifest))
        floor_list = _time_inprocess(lambda: [v.manifest for v in reg.list_versions(m.full_name)[:50]])
        print(f"in-process floor (no HTTP, one thread): model + latest manifest {floor_get:.2f} ms; "
              f"list + 50 manifests {floor_list:.2f} ms")

        # ---------------------------------------------------------------- queue pick-up
        if args.trainings:
            trainings = Trainings(reg)
            data = str(sample_data_path())
            body = {"destination": "bench/trained",
                    "input": {"data": {"path": data, "max_seq_len": 128}, "train.max_steps": 2,
                              "train.batch_size": 4}}
            http = httpx.Client(base_url=url, headers=headers, timeout=30)
            client = replicate.Client(api_token=token, base_url=url)

            def one(via: str) -> tuple[float, float]:
                time.sleep(8)  # an idle queue: the worker that ran the last training is gone, its spare ready
                t0 = time.perf_counter()
                if via == "httpx":
                    r = http.post(f"/v1/models/base/tiny/versions/{base.id}/trainings", json=body)
                    r.raise_for_status()
                    training_id = r.json()["id"]
                else:
                    training_id = client.trainings.create(version=f"base/tiny:{base.id}", input=body["input"],
                                                          destination="bench/trained").id
                claimed = processing = None
                deadline = time.monotonic() + 300
                while processing is None:
                    record = trainings.get(training_id)
                    now = time.perf_counter() - t0
                    if claimed is None and record.pid:
                        claimed = now
                    status = (http.get(f"/v1/trainings/{training_id}").json()["status"] if via == "httpx"
                              else client.trainings.get(training_id).status)
                    if status in ("processing", "succeeded"):
                        processing = time.perf_counter() - t0
                    elif status in ("failed", "canceled") or time.monotonic() > deadline:
                        raise SystemExit(f"training {training_id} {status}: {record.error}")
                    time.sleep(0.01)
                while trainings.get(training_id).status not in ("succeeded", "failed", "canceled"):
                    time.sleep(0.1)
                return claimed if claimed is not None else processing, processing

            print(f"\ntraining pick-up: {args.trainings} trainings per way (2 steps of a tiny model), each on an "
                  f"idle queue")
            print(f"{'':42} {'via':10} {'claimed s (median / max)':>26} {'processing s (median / max)':>30}")
            for via in ("httpx", "replicate"):
                runs = [one(via) for _ in range(args.trainings)]
                c, p = [r[0] for r in runs], [r[1] for r in runs]
                verdict = "ok" if max(c) < TARGET_PICKUP_S else "OVER"
                print(f"{'POST .../trainings':42} {via:10} {statistics.median(c):12.3f} / {max(c):6.3f}       "
                      f"{statistics.median(p):12.3f} / {max(p):6.3f}   pick-up target "
                      f"{TARGET_PICKUP_S:.0f} s: {verdict}")
        return 0
    finally:
        stop_server(server)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
