#!/usr/bin/env python
"""Benchmark ``finetune serve --predict-executor ray`` on a local Ray cluster against local inference workers.

    python scripts/bench_cluster_predict.py                 # 10 warm predictions and 3 long ones per side
    python scripts/bench_cluster_predict.py --warm 3 --long 1 --hidden 64          # a quick look

A random Llama (hidden ``--hidden``, 2 layers, 8192 positions) served by two servers at once, each over a
registry of its own: one with a local inference worker (``--predict-workers 1``: one process), one with
``--predict-executor ray --predict-workers 1`` on a head without CPUs and one worker node
(``finetune.cluster.local.LocalCluster``); inference on one torch thread on both sides (``--predict-threads
1``). Each measurement is taken on both sides in turn, so that the load of a shared machine weighs on both
alike. Per side: the first prediction (the worker loads the model), the
median of ``--warm`` warm 8-token predictions (``Prefer: wait``: the HTTP round trip included), and
``--long`` greedy predictions of ``--tokens`` tokens each (the decode rate from the record's ``predict_time``,
and the wall time from the request until the record ended, which includes every streamed piece's trip).
The script runs itself in a network namespace of its own (``unshare -n``): nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warm", type=int, default=10, help="warm 8-token predictions per side (default 10)")
    p.add_argument("--long", type=int, default=3, help="long predictions per side (default 3)")
    p.add_argument("--tokens", type=int, default=1000, help="tokens of each long prediction (default 1000)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the model (default 128)")
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def serve(root: Path, log: Path, *options: str):
    from serve_process import start_server

    from finetune.launch import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "finetune", "--registry", str(root), "serve", "--port", str(port),
                         "--log-level", "warning", "--no-access-log", "--predict-threads", "1", *options],
                        url, log, timeout_s=180)
    return proc, url


def measure(sides: dict[str, tuple[str, str, str]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each measurement taken on both sides in turn (``sides``: name -> (server URL, version id, token)), so that
    the machine's load at the time weighs on both alike."""
    import httpx

    def predict(side: str, wait: bool, **input: object) -> dict:
        url, version, token = sides[side]
        headers = {"Prefer": "wait=60", "Authorization": f"Bearer {token}"} if wait else \
            {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
            out = http.post("/v1/predictions", json={"version": version, "input": {"prompt": "Hello", **input}}).json()
            while out["status"] not in ("succeeded", "failed", "canceled"):
                time.sleep(0.02)
                out = http.get(f"/v1/predictions/{out['id']}").json()
        assert out["status"] == "succeeded", out
        return out

    def timed(side: str, wait: bool, **input: object) -> tuple[float, dict]:
        t = time.monotonic()
        out = predict(side, wait, **input)
        return time.monotonic() - t, out

    found: dict[str, dict[str, list[float]]] = {side: {} for side in sides}

    def note(side: str, key: str, value: float) -> None:
        found[side].setdefault(key, []).append(value)

    for side in sides:
        note(side, "first_s", timed(side, True, max_new_tokens=8)[0])
    for _ in range(args.warm):
        for side in sides:
            note(side, "warm_median_s", timed(side, True, max_new_tokens=8)[0])
    for _ in range(args.long):
        for side in sides:
            wall, out = timed(side, False, max_new_tokens=args.tokens)
            note(side, "long_wall_s", wall)
            note(side, "long_tokens_per_s", out["metrics"]["output_token_count"] / out["metrics"]["predict_time"])
    return {side: {k: round(statistics.median(v), 4) for k, v in keys.items()} for side, keys in found.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.in_netns:
        from finetune.cluster.local import in_own_netns

        command = in_own_netns([sys.executable, __file__, "--in-netns", *(argv or sys.argv[1:])])
        return subprocess.run(command).returncode
    from cluster_harness import quiet_environment
    from serve_process import stop_server

    from finetune.cluster.local import LocalCluster, check_loopback_only
    from finetune.registry import Registry
    from finetune.registry.accounts import Accounts
    from finetune.registry.sources import import_base
    from finetune.tiny import build_tiny_model

    check_loopback_only()
    quiet_environment()
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    model = build_tiny_model(work / "tiny", hidden_size=args.hidden, num_layers=2, num_heads=4,
                             max_position_embeddings=8192)
    cluster = LocalCluster(workers=1, worker_cpus=2)
    options = {"local": (), "ray": ("--predict-executor", "ray", "--ray-address", cluster.address,
                                    "--predict-ray-resource", "predictor=1")}
    sides, procs = {}, []
    try:
        for side, extra in options.items():  # one registry per server (one server per registry), same model
            reg = Registry(work / f"registry-{side}")
            version = import_base(reg, "base/x", str(model), visibility="public").id
            token = Accounts(reg).create_token("alice", label="bench")
            proc, url = serve(reg.root, work / f"{side}.log", *extra)
            procs.append(proc)
            sides[side] = (url, version, token)
        results = measure(sides, args)
    finally:
        for proc in procs:
            stop_server(proc)
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    for side, figures in results.items():
        print(side, json.dumps(figures), flush=True)
    ray, local = results["ray"], results["local"]
    ratios = {f"{k}_ray_over_local": round(ray[k] / local[k], 2) for k in local}
    print(json.dumps({"hidden": args.hidden, "cpus": os.cpu_count(), **ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
