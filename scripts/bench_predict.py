#!/usr/bin/env python
"""Serving predictions: finetune's inference worker against the transformers + PEFT loop a user would write.

    python scripts/bench_predict.py [--data ../shared/data/alpaca_5000.json] [--rounds 3] [--threads N]

The model is the training benchmark's (scripts/bench_train.py: a Llama built locally with random weights,
hidden 512, 8 layers, vocabulary 8192 from a tokenizer trained on the data; about 30M parameters), imported as a
registry base; four versions of it are short LoRA fine-tunes (r 16, all linear layers). Prompts are held-out
Alpaca instructions, rendered and tokenized by finetune for both sides (the same ids); decoding is greedy.

Contenders, in one process, on the same device and threads, interleaved round by round:
  ours         finetune.serving's worker core (cache + batching engine, no HTTP), adapters unmerged on a shared base;
  peer-merged  AutoModelForCausalLM + PeftModel.from_pretrained(...).merge_and_unload(), model.generate per request;
  peer-peft    the same without merging (a PeftModel), model.generate per request.

Measured and printed (each a median over the rounds, the ratios from the same run):
  1. warm single request: latency and output tokens/s, contenders alternating request by request, the ratio
     the median of back-to-back pairs (target: ours >= peer-merged);
  2. N concurrent requests of M new tokens (default 16 x 64): total output tokens/s; the peers answer them one at
     a time (target: ours >= 3x peer-peft's loop); with --openai, also the same requests sent at once to a
     ``finetune serve`` over the same registry (its own process and worker) through ``POST /openai/v1/completions``;
  3. no reload: fresh workers' 1st, 2nd and 3rd request on a version (target: 2nd within 10% of the 3rd);
  4. memory: weights held with 4 versions of one base loaded vs 1 (the cache's own accounting, and the process's
     resident memory growth) (target: < 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))  # serve_process: the server in its own process
_DATA_CANDIDATES = [REPO.parent / "shared" / "data" / "alpaca_5000.json",
                    REPO.parent.parent / "shared" / "data" / "alpaca_5000.json"]
DEFAULT_DATA = next((p for p in _DATA_CANDIDATES if p.exists()), _DATA_CANDIDATES[0])


SINGLE_PROMPTS = 6  # single requests per contender per round


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_registry(data: Path, work: Path, versions: int) -> tuple[object, dict]:
    """The benchmark's base model imported as ``bench/base``, and ``versions`` short fine-tunes of it (bench/m)."""
    from bench_train import build_inputs

    from finetune import training
    from finetune.config import config_from_dict
    from finetune.registry import Registry
    from finetune.registry.sources import import_base

    paths = build_inputs(data, work, "llama")
    reg = Registry(work / "registry")
    if not (reg.root / "models" / "bench" / "base").exists():
        import_base(reg, "bench/base", paths["model"])
    have = len(reg.list_versions("bench/m")) if (reg.root / "models" / "bench" / "m").exists() else 0
    for seed in range(have, versions):
        cfg = config_from_dict({
            "base_model": "bench/base:1",
            "data": {"path": paths["train"], "format": "alpaca", "max_seq_len": 256},
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 2e-3, "seed": seed},
        })
        training.train(cfg, registry=reg, destination="bench/m", create_destination=True, progress=False)
    return reg, paths


class Ours:
    """finetune's worker core in this process: submit, wait for ends, read counts."""

    def __init__(self, reg, device: str, max_batch: int = 32):
        from finetune.serving.worker import LocalWorker, WorkerConfig

        self.cond = threading.Condition()
        self.done: dict[str, dict] = {}
        self.n = 0
        self.worker = LocalWorker(WorkerConfig(str(reg.root), device=device, max_batch=max_batch), self._event)

    def _event(self, job_id: str, kind: str, payload: dict) -> None:
        if kind in ("done", "rejected"):
            with self.cond:
                self.done[job_id] = payload
                self.cond.notify_all()

    def run(self, ref: str, prompts: list[str], new_tokens: int) -> tuple[float, int]:
        """Submit every prompt at once; (seconds until the last ends, output tokens in all)."""
        ids = []
        start = time.perf_counter()
        for prompt in prompts:
            self.n += 1
            job_id = f"j{self.n}"
            ids.append(job_id)
            self.worker.submit(job_id, ref, {"prompt": prompt, "max_new_tokens": new_tokens})
        with self.cond:
            self.cond.wait_for(lambda: all(i in self.done for i in ids), 600)
        elapsed = time.perf_counter() - start
        ends = [self.done[i] for i in ids]
        bad = [e for e in ends if e.get("status") != "succeeded"]
        if bad:
            raise SystemExit(f"ours failed: {bad[0]}")
        return elapsed, sum(e["metrics"]["output_token_count"] for e in ends)

    def stats(self) -> dict:
        return self.worker.stats()

    def close(self) -> None:
        self.worker.close()


class Peer:
    """What a user would write: transformers base + PeftModel, ``generate`` per request."""

    def __init__(self, base_dir: str, adapter_dir: str, device, merge: bool, dtype):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        model = PeftModel.from_pretrained(model, adapter_dir)
        if merge:
            model = model.merge_and_unload()
        self.model = model.to(device).eval()
        self.device = device

    def run(self, prompt_ids: list[list[int]], new_tokens: int, eos: list[int], pad: int) -> tuple[float, int]:
        import torch

        tokens = 0
        start = time.perf_counter()
        with torch.inference_mode():
            for ids in prompt_ids:  # one request at a time, as a generate-per-request server does
                x = torch.tensor([ids], device=self.device)
                out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                          do_sample=False, eos_token_id=eos, pad_token_id=pad)
                new = out[0, x.shape[1]:].tolist()
                tokens += next((i for i, t in enumerate(new) if t in eos), len(new))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, tokens


def openai_rounds(root: Path, ref: str, prompts: list[str], new_tokens: int, rounds: int, device: str,
                  threads: int | None) -> list[tuple[float, int]]:
    """``rounds`` times: every prompt sent at once to ``finetune serve``'s ``/openai/v1/completions`` (greedy, at most
    ``new_tokens``); (seconds until the last answer, output tokens in all) per round. The server runs in its own
    process over the same registry, one inference worker on ``device``; it is stopped at the end."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from serve_process import start_server, stop_server

    from finetune.launch import free_port
    from finetune.registry import Registry
    from finetune.registry.accounts import Accounts

    token = Accounts(Registry(root)).create_token(ref.split("/", 1)[0], label="bench_predict")
    port = free_port()
    url = f"http://127.0.0.1:{port}/openai/v1"
    cmd = [sys.executable, "-m", "finetune", "--registry", str(root), "serve", "--port", str(port),
           "--predict-device", device, "--predict-max-per-account", "0", "--predict-max-batch", "32"]
    cmd += ["--predict-threads", str(threads)] if threads else []
    headers = {"Authorization": f"Bearer {token}"}
    server = start_server(cmd, url, root.parent / "serve.log", probe="/models", headers=headers, timeout_s=120,
                          interval_s=0.1, output="errors")
    try:
        with httpx.Client(headers=headers, timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as http:
            def complete(prompt: str, tokens: int = new_tokens) -> int:
                r = http.post(f"{url}/completions", json={"model": ref, "prompt": prompt, "max_tokens": tokens,
                                                          "temperature": 0})
                if r.status_code != 200:
                    raise SystemExit(f"/openai/v1/completions answered {r.status_code}: {r.text}")
                return r.json()["usage"]["completion_tokens"]

            complete(prompts[0], 4)  # the worker starts and loads the version
            out = []
            with ThreadPoolExecutor(len(prompts)) as pool:
                for _ in range(rounds):
                    start = time.perf_counter()
                    tokens = sum(pool.map(complete, prompts))
                    out.append((time.perf_counter() - start, tokens))
        return out
    finally:
        stop_server(server, 30)


def _memory_child(root: str, refs: list[str], device: str, prompt: str, results) -> None:
    """Load versions of one base one by one in a new worker; put (stats, RSS growth) after the 1st and the 4th."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from finetune.registry import Registry
    from finetune.training.runlog import quiet_libraries

    quiet_libraries()
    import torch  # noqa: F401  (imported before the baseline: it is no part of what a version costs)

    before = rss_mb()
    mem = Ours(Registry(root), device)
    mem.run(refs[0], [prompt], 2)
    one, rss_one = mem.stats(), rss_mb() - before
    for ref in refs[1:]:
        mem.run(ref, [prompt], 2)
    four, rss_four = mem.stats(), rss_mb() - before
    mem.close()
    results.put((one, rss_one, four, rss_four))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu or cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--openai", action="store_true",
                        help="also send figure 2's requests through finetune serve's /openai/v1/completions")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.data.exists():
        raise SystemExit(f"no data at {args.data}; pass --data PATH (Alpaca-format JSON)")

    import torch

    from finetune.inference import Prompt, inference_precision, load_version, prompt_ids
    from finetune.modeling.precision import torch_dtype
    from finetune.training.runlog import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device in ("auto", "cuda", "gpu") and torch.cuda.is_available() else "cpu")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-predict-"))
    reg, paths = build_registry(args.data, work, versions=4)
    refs = [v.ref for v in sorted(reg.list_versions("bench/m"), key=lambda v: v.number)][:4]
    held_out = [json.loads(line) for line in Path(paths["eval"]).read_text().splitlines()]
    prompts = [r["instruction"] for r in held_out if r["instruction"].strip() and not r.get("input")][:args.concurrent]
    loaded = load_version(reg, refs[0], device="cpu")  # finetune renders and tokenizes; both sides get these ids
    ids = [prompt_ids(loaded, Prompt(p)) for p in prompts]
    tok = loaded.tokenizer
    eos, pad = [tok.eos_token_id], tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    del loaded
    adapter = str(reg.resolve(refs[0]).path)
    from bench_train import capability

    cap = capability()
    precision = inference_precision("auto", device)  # what ours picks; a sensible user loads the peers so too
    print(f"machine: {cap['device']}; {cap['kind']}; every contender decodes in {precision}", flush=True)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.rounds} rounds; "
          f"1 base x {len(refs)} versions; prompts {len(ids)} "
          f"(input tokens {min(map(len, ids))}-{max(map(len, ids))}), {args.new_tokens} new tokens, greedy", flush=True)

    ours = Ours(reg, device.type)
    peers = {"peer-merged": Peer(paths["model"], adapter, device, merge=True, dtype=torch_dtype(precision)),
             "peer-peft": Peer(paths["model"], adapter, device, merge=False, dtype=torch_dtype(precision))}
    ours.run(refs[0], prompts[:1], 4)  # load + warm up every contender once
    for peer in peers.values():
        peer.run(ids[:1], 4, eos, pad)

    single: dict[str, list[tuple[float, int]]] = {k: [] for k in ("ours", *peers)}
    batch: dict[str, list[tuple[float, int]]] = {k: [] for k in ("ours", *peers)}
    for r in range(args.rounds):
        # Single requests alternate between contenders prompt by prompt (the order rotating), so that a slow
        # drift in the machine's speed (other tenants) touches every contender alike; ratios are taken per pair.
        names = ("ours", *peers)
        for k, (prompt, pid) in enumerate(zip(prompts[:SINGLE_PROMPTS], ids[:SINGLE_PROMPTS])):
            for name in names[k % len(names):] + names[:k % len(names)]:
                single[name].append(ours.run(refs[0], [prompt], args.new_tokens) if name == "ours"
                                    else peers[name].run([pid], args.new_tokens, eos, pad))
        for name in ("ours", *peers):
            batch[name].append(ours.run(refs[0], prompts, args.new_tokens) if name == "ours"
                               else peers[name].run(ids, args.new_tokens, eos, pad))
        print(f"round {r + 1}: " + ", ".join(f"{k} {t:.2f}s/{n} tok" for k, (t, n) in
                                             ((k, v[-1]) for k, v in batch.items())), flush=True)
    engine_stats = ours.stats()
    ours.close()
    del peers

    def med_latency(rows):
        return statistics.median(t for t, _ in rows)

    def med_rate(rows):
        return statistics.median(n / t for t, n in rows)

    figures: dict[str, dict] = {"single": {}, "concurrent": {}}
    print(f"\n1. warm single request ({args.new_tokens} new tokens max; median of {len(single['ours'])})")
    for name, rows in single.items():
        figures["single"][name] = {"latency_s": med_latency(rows), "tokens_per_s": med_rate(rows),
                                   "tokens": statistics.median(n for _, n in rows)}
        f = figures["single"][name]
        print(f"   {name:12s} {f['latency_s'] * 1000:8.1f} ms  {f['tokens_per_s']:8.1f} tok/s  "
              f"({f['tokens']:.0f} tokens)")
    pairs = sorted((n / t) / (pn / pt) for (t, n), (pt, pn) in zip(single["ours"], single["peer-merged"]))
    ratio_single = statistics.median(pairs)
    print(f"   ours / peer-merged tokens/s: {ratio_single:.2f}x, the median of {len(pairs)} back-to-back pairs "
          f"(quartiles {pairs[len(pairs) // 4]:.2f}-{pairs[3 * len(pairs) // 4]:.2f}; target >= 1.0)")

    print(f"\n2. {len(prompts)} concurrent requests x {args.new_tokens} new tokens: total output tokens/s "
          f"(median of {args.rounds})")
    for name, rows in batch.items():
        figures["concurrent"][name] = {"tokens_per_s": med_rate(rows), "seconds": med_latency(rows),
                                       "tokens": statistics.median(n for _, n in rows)}
        f = figures["concurrent"][name]
        print(f"   {name:12s} {f['tokens_per_s']:8.1f} tok/s  {f['seconds']:7.2f} s  ({f['tokens']:.0f} tokens)")
    ratio_batch = figures["concurrent"]["ours"]["tokens_per_s"] / figures["concurrent"]["peer-peft"]["tokens_per_s"]
    ratio_batch_merged = (figures["concurrent"]["ours"]["tokens_per_s"]
                          / figures["concurrent"]["peer-merged"]["tokens_per_s"])
    print(f"   ours / peer-peft loop: {ratio_batch:.2f}x (target >= 3); ours / peer-merged loop: "
          f"{ratio_batch_merged:.2f}x; batching: {engine_stats['max_rows']} rows at most in one step")
    if args.openai:
        rows = openai_rounds(reg.root, refs[0], prompts, args.new_tokens, args.rounds, device.type, args.threads)
        f = {"tokens_per_s": med_rate(rows), "seconds": med_latency(rows),
             "tokens": statistics.median(n for _, n in rows)}
        figures["concurrent"]["ours-openai"] = f
        print(f"   {'ours-openai':12s} {f['tokens_per_s']:8.1f} tok/s  {f['seconds']:7.2f} s  ({f['tokens']:.0f} "
              f"tokens): the same requests over HTTP to finetune serve's /openai/v1/completions, "
              f"{f['tokens_per_s'] / figures['concurrent']['ours']['tokens_per_s']:.2f}x ours in-process")

    # 3. no reload: fresh workers (one per round), three requests each on a version they have not seen
    firsts, seconds, thirds, loads = [], [], [], []
    for r in range(args.rounds):
        fresh = Ours(reg, device.type)
        t1, t2, t3 = (fresh.run(refs[1 + r % 3], prompts[:1], args.new_tokens)[0] for _ in range(3))
        firsts.append(t1)
        seconds.append(t2)
        thirds.append(t3)
        loads.append(fresh.stats()["loads"])
        fresh.close()
    first, second, third = (statistics.median(v) for v in (firsts, seconds, thirds))
    figures["reload"] = {"first_s": first, "second_s": second, "third_s": third,
                         "second_over_third": second / third, "loads_per_worker": max(loads)}
    print(f"\n3. no reload (median of {args.rounds} fresh workers): 1st {first * 1000:.0f} ms (loads), 2nd "
          f"{second * 1000:.0f} ms, 3rd {third * 1000:.0f} ms; 2nd/3rd {second / third:.3f} (target within 10%); "
          f"versions loaded per worker {max(loads)}")

    # 4. memory of 4 versions of one base vs 1, in a fresh process: in this one, the peers' freed memory would
    # be reused by the first load and hide it from the resident-memory growth
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_memory_child, args=(str(reg.root), refs, device.type, prompts[0], results))
    child.start()
    one, rss_one, four, rss_four = results.get(timeout=600)
    child.join()
    figures["memory"] = {"one_bytes": one["bytes"], "four_bytes": four["bytes"], "ratio": four["bytes"] / one["bytes"],
                         "rss_one_mb": rss_one, "rss_four_mb": rss_four, "bases": four["bases"],
                         "base_objects": four["base_objects"]}
    print(f"\n4. memory: 1 version {one['bytes'] / 2**20:.1f} MiB of weights, 4 versions "
          f"{four['bytes'] / 2**20:.1f} MiB ({four['bytes'] / one['bytes']:.3f}x, target < 1.5; bases held "
          f"{four['bases']}); process growth {rss_one:.0f} MiB -> {rss_four:.0f} MiB "
          f"({rss_four / max(rss_one, 1e-9):.2f}x, a fresh process); 4 merged copies would be ~4x")
    figures["ratios"] = {"single_vs_merged": ratio_single, "concurrent_vs_peft_loop": ratio_batch,
                         "concurrent_vs_merged_loop": ratio_batch_merged}
    figures["setup"] = {"machine": cap, "precision": precision, "device": str(device),
                        "threads": torch.get_num_threads(), "rounds": args.rounds, "concurrent": len(prompts),
                        "new_tokens": args.new_tokens}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
