"""The DPO part of `scripts/bench_train.py --method dpo`: finetune's `train.method: dpo` against TRL's DPOTrainer
with PEFT, in one run, each contender in its own process.

    python scripts/bench_train.py --method dpo [--arch llama] [--precision auto|fp32|bf16] [--steps 30] [--warmup 3]
                                  [--repeat N] [--only ours peer-default peer-tuned] [--beta 0.1]

The model, tokenizer, precision rule, process isolation, peak memory and machine facts are bench_train's. The
preference set is built here from the same Alpaca file (:func:`build_pairs`): the prompt is the Alpaca prompt, the
chosen answer the row's reference answer, the rejected one either another row's answer (even rows) or the reference
answer cut to its first half of words (odd rows, when it has at least 4 words). The 200 held-out Alpaca rows give
the held-out pairs; the training pairs are one epoch of (warmup + steps) x 8 rows, the same for everyone.

Contenders (LoRA r 16 / alpha 32 on all linear layers, 8 pairs a step, max length 512, lr 2e-4 on a cosine schedule
without warm-up, gradient clipping at 1.0, beta 0.1, sigmoid loss):
  1. ours         the real `finetune train` command with `train.method: dpo`, its defaults otherwise;
  2. peer-default DPOTrainer + peft_config with DPOConfig's defaults but for the shared settings above (fp32, random
                  order, a reference forward in every step through the adapter switched off);
  3. peer-tuned   the same with what a sensible user sets: the precision ours uses (bf16 where native),
                  `precompute_ref_log_probs=True` (the reference pass over the data once, before training, in
                  batches of 32; its time is charged to the timed steps pro rata of their tokens) and
                  `train_sampling_strategy="group_by_length"` (on a length column added to TRL's tokenized set).
                  TRL 1.16's `padding_free` only warns and falls back to padding ("temporarily unavailable").
Speed: real (non-padding) tokens of both sequences per second over the epoch but for each one's first step. Held-out
reward accuracy: every final adapter scored by one function (:func:`held_out_rewards`, finetune's DpoLoss in fp32 on
pairs encoded by finetune's data layer, the adapter merged): the share of held-out pairs whose implicit reward
(beta times the log-ratio against the base) is higher for the chosen answer, the mean reward margin and DPO loss.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_train as common

BETA = 0.1
PRECOMPUTE_BATCH = 32
ROLES = ("ours", "peer-default", "peer-tuned")


# ---------------------------------------------------------------- the preference set
def build_pairs(records: list[dict]) -> list[dict]:
    """``{prompt, chosen, rejected}`` per Alpaca row (see the module docstring); deterministic."""
    from finetune.data.formats import alpaca_prompt

    n, pairs = len(records), []
    for i, record in enumerate(records):
        chosen = record["output"]
        words = chosen.split()
        if i % 2 and len(words) >= 4:
            rejected = " ".join(words[: len(words) // 2])
        else:  # another row's answer, half the set away (never the same text)
            j = (i + n // 2) % n
            while records[j]["output"].strip() == chosen.strip():
                j = (j + 1) % n
            rejected = records[j]["output"]
        pairs.append({"prompt": alpaca_prompt(record["instruction"], record.get("input") or ""),
                      "chosen": chosen, "rejected": rejected})
    return pairs


def write_pairs(data: Path, work: Path, rows: int) -> dict:
    """The training pairs (the first ``rows`` of the training split) and the held-out pairs, as JSONL files."""
    train, held_out = common.bench_data.split(json.loads(data.read_text()), common.bench_data.HELD_OUT["alpaca"])
    out = {"pairs": work / f"pairs-{rows}.jsonl", "held_out_pairs": work / "pairs-held-out.jsonl"}
    for key, chosen in (("pairs", train[:rows]), ("held_out_pairs", held_out)):
        out[key].write_text("".join(json.dumps(p) + "\n" for p in build_pairs(chosen)))
    return {k: str(v) for k, v in out.items()}


# ---------------------------------------------------------------- contenders
def run_ours(paths: dict, steps: int, work: Path, precision: str, overrides: list[str] = ()) -> dict:
    """The real `finetune train` CLI with method dpo and its defaults (bar the shared benchmark settings)."""
    home = work / "registry-ours-dpo"
    cfg = work / "ours-dpo.yaml"
    cfg.write_text(json.dumps({
        "base_model": paths["model"], "destination": "bench/dpo",
        "data": {"path": paths["pairs"], "max_seq_len": common.MAX_LEN},
        "lora": {**common.LORA, "target_modules": "all-linear"},
        "train": {"method": "dpo", "max_steps": steps, "batch_size": common.BATCH, "lr": common.LR,
                  "seed": common.SEED, "precision": precision},
        "dpo": {"beta": BETA, "loss": "sigmoid"},
    }))
    cmd = [sys.executable, "-m", "finetune", "train", str(cfg), "--create-destination", "--quiet",
           *(arg for item in overrides for arg in ("--set", item))]
    result = common._timed_child(cmd, dict(os.environ, FINETUNE_HOME=str(home), HF_HUB_OFFLINE="1"))
    if result["returncode"] != 0:
        raise SystemExit(f"ours failed:\n{result['stderr'][-3000:]}")
    from finetune.registry import Registry
    from finetune.registry.jobs import Trainings
    from finetune.training.metrics import MetricsLog

    registry = Registry(home)
    version, trainings = registry.resolve("bench/dpo"), Trainings(registry)
    rows = MetricsLog(trainings.paths(version.metadata["training_id"]).metrics).read()
    summary = trainings.get(version.metadata["training_id"]).metrics
    return {**result, "steps": [(r["time_s"], r["tokens"]) for r in rows], "losses": [r["loss"] for r in rows],
            "train_accuracy": [r.get("reward_accuracy") for r in rows], "adapter": str(version.path),
            "gpu_peak_mb": summary["peak_memory_mb"] if summary["device"] == "cuda" else None}


def run_peer(role: str, paths: dict, steps: int, work: Path, precision: str) -> dict:
    cmd = [sys.executable, common.__file__, "--method", "dpo", "--role", role, "--paths", json.dumps(paths),
           "--steps", str(steps), "--work", str(work), "--precision", precision]
    result = common._timed_child(cmd, dict(os.environ, HF_HUB_OFFLINE="1"))
    if result["returncode"] != 0:
        raise SystemExit(f"{role} failed:\n{result['stderr'][-3000:]}")
    return {**result, **json.loads(result["stdout"].strip().splitlines()[-1])}


def peer_main(args) -> None:
    """Child process: TRL's DPOTrainer with peft_config, default or tuned."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    paths = json.loads(args.paths)
    tuned = args.role == "peer-tuned"
    counted: list[int] = []
    clock = {"start": 0.0, "precompute_s": 0.0}
    marks: list[tuple[float, int]] = []

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):  # the reference pass is training work: timed
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                clock["precompute_s"] += time.perf_counter() - t

    class Clock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            clock["start"] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):  # the loader collates one batch ahead
            marks.append((time.perf_counter() - clock["start"], sum(counted[: state.global_step])))

    tok = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
    targs = DPOConfig(
        output_dir=str(Path(args.work) / f"dpo-{args.role}"), per_device_train_batch_size=common.BATCH,
        learning_rate=common.LR, max_steps=args.steps, lr_scheduler_type="cosine", max_length=common.MAX_LEN,
        beta=BETA, seed=common.SEED, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        bf16=tuned and args.precision == "bf16",
        **(dict(precompute_ref_log_probs=True, precompute_ref_batch_size=PRECOMPUTE_BATCH,
                train_sampling_strategy="group_by_length", remove_unused_columns=False) if tuned else {}))
    trainer = Timed(model=model, args=targs, processing_class=tok, callbacks=[Clock()],
                    train_dataset=load_dataset("json", data_files=paths["pairs"], split="train"),
                    peft_config=LoraConfig(r=common.LORA["r"], lora_alpha=common.LORA["alpha"],
                                           target_modules="all-linear", task_type="CAUSAL_LM",
                                           fan_in_fan_out=model.config.model_type == "gpt2"))
    if tuned:  # the padded length of a pair is its longer side's
        data = trainer.train_dataset
        trainer.train_dataset = data.add_column("length", [
            len(p) + max(len(c), len(r)) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                             data["rejected_ids"])])
    collate = trainer.data_collator  # wrapped after the precompute: only training batches count

    def counting(examples):
        batch = collate(examples)
        counted.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    adapter = Path(args.work) / f"dpo-{args.role}-adapter"
    trainer.model.save_pretrained(adapter)
    total = marks[-1][1] if marks else 1
    # the precompute is charged to each step in proportion to its tokens, so any window's rate carries its share
    marks = [(t + clock["precompute_s"] * n / total, n) for t, n in marks]
    history = [h for h in trainer.state.log_history if "loss" in h]
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"steps": marks, "losses": [h["loss"] for h in history],
                      "train_accuracy": [h.get("rewards/accuracies") for h in history], "adapter": str(adapter),
                      "precompute_s": clock["precompute_s"], "gpu_peak_mb": gpu_peak}), flush=True)


# ---------------------------------------------------------------- judging
def held_out_rewards(paths: dict, adapter: str, work: Path) -> dict:
    """One scorer for every final adapter: in fp32 over the held-out pairs (encoded by finetune's data layer), the
    summed answer log-probabilities of finetune's DpoLoss with the adapter merged, against the base's (computed
    once, kept in ``work``); the reward accuracy, mean margin and DPO loss as finetune's dpo module defines them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.batching import pad_id
    from finetune.data.preference import prepare_pairs
    from finetune.modeling.load import attach_lora
    from finetune.training.dpo import DpoLoss, collate_pairs, dpo_losses

    tok = AutoTokenizer.from_pretrained(paths["model"])
    pairs = prepare_pairs(paths["held_out_pairs"], tok, max_seq_len=common.MAX_LEN).train
    pairs = pairs.sort("length")  # batches of similar lengths: less padding (the order changes no figure)

    def logps(model) -> torch.Tensor:  # per pair: [chosen, rejected]
        scorer, out = DpoLoss(model, BETA).eval(), []
        with torch.inference_mode():
            for i in range(0, len(pairs), common.BATCH):
                (batch,) = collate_pairs([pairs[j] for j in range(i, min(i + common.BATCH, len(pairs)))], pad_id(tok))
                out.append(scorer.sequence_logps(**batch)[0].view(2, -1).t())
        return torch.cat(out)

    base = lambda: AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)  # noqa: E731
    cached = work / "held-out-reference-logps.pt"
    if not cached.exists():
        torch.save(logps(base()), cached)
    ref = torch.load(cached)
    policy = logps(attach_lora(base(), None, adapter_dir=adapter, trainable=False).merge_and_unload())
    chosen, rejected = BETA * (policy[:, 0] - ref[:, 0]), BETA * (policy[:, 1] - ref[:, 1])
    loss = dpo_losses(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], BETA, "sigmoid")
    return {"reward_accuracy": float((chosen > rejected).float().mean()),
            "reward_margin": float((chosen - rejected).mean()), "dpo_loss": float(loss.mean()), "pairs": len(pairs)}


def main(args) -> None:
    """`bench_train.py --method dpo`: the parent (rounds of every contender, then the table) or a peer's child."""
    import torch

    if args.role:
        return peer_main(args)
    if not args.source.exists():
        raise SystemExit(f"data file {args.source} not found (pass --source PATH)")
    if args.data != "alpaca":
        raise SystemExit(f"--method dpo builds its pairs from the Alpaca rows: --data {args.data} does not apply")
    work = args.work or Path(tempfile.mkdtemp(prefix="ft-bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    total_steps = args.steps + args.warmup
    rows = total_steps * common.BATCH
    paths = {**common.build_inputs(args.source, work, args.arch, "alpaca", args.vocab),
             **write_pairs(args.source, work, rows)}
    cap = common.capability()
    precision = cap["auto"] if args.precision == "auto" else args.precision
    precisions = {"ours": precision, "peer-default": "fp32", "peer-tuned": precision}
    memory, memory_name = (("gpu_peak_mb", "peak GPU MB") if torch.cuda.is_available()
                           else ("peak_rss_mb", "peak RSS MB"))
    readings = [common.matmul_rates(cap["native_bf16"])]
    rounds: dict[str, list[dict]] = {role: [] for role in args.only}
    for i in range(args.repeat):
        for role in args.only:
            print(f"round {i + 1}/{args.repeat}: dpo {role} ...", flush=True)
            run = (run_ours(paths, total_steps, work, precision, args.set) if role == "ours" else
                   run_peer(role, paths, total_steps, work, precisions[role]))
            run["rate"], run["trained"] = common.timed_rate(run["steps"], 1)
            rounds[role].append(run)
            print(f"  {run['rate']:.0f} tok/s, peak {run[memory]:.0f} MB, wall {run['wall_s']:.1f} s, other work "
                  f"{run['others_cores'] or 0:.2f} cores", flush=True)
            readings.append(common.matmul_rates(cap["native_bf16"]))
    rates = {key: max(reading[key] for reading in readings) for key in readings[0]}
    results = {}
    for role, runs in rounds.items():
        r = dict(runs[0])  # seeded: every round trains the same pairs to the same adapter
        r.update(rates=[x["rate"] for x in runs], memory_rounds=[x[memory] for x in runs],
                 others_rounds=[x["others_cores"] for x in runs])
        r.update(rate=statistics.median(r["rates"]), memory_mb=statistics.median(r["memory_rounds"]),
                 wall_s=statistics.median(x["wall_s"] for x in runs))
        r["held_out"] = held_out_rewards(paths, r["adapter"], work)
        results[role] = r
    report(results, args, cap, precision, precisions, rates, rows, memory_name)
    (work / "results-dpo.json").write_text(json.dumps(
        {k: {kk: vv for kk, vv in v.items() if kk not in ("stdout", "stderr")} for k, v in results.items()}
        | {"matmul": rates, "capability": cap, "arch": args.arch, "precisions": {k: precisions[k] for k in results}},
        indent=2))
    print(f"\ndetails: {work / 'results-dpo.json'}")


def report(results: dict, args, cap: dict, precision: str, precisions: dict, rates: dict, rows: int,
           memory_name: str) -> None:
    print(f"\nmachine: {cap['device']}; {cap['kind']}; --precision {args.precision} -> {precision}")
    print(f"matmul peaks (best of readings before the runs and after each): bf16 {rates['bf16']:.0f} GFLOP/s, "
          f"fp32 {rates['fp32']:.0f} GFLOP/s; model: {args.arch}")
    print(f"DPO, {args.warmup + args.steps} steps of {common.BATCH} pairs, one epoch over the same {rows} pairs for "
          f"everyone, timed after each one's first step; max length {common.MAX_LEN}, beta {BETA}; medians of "
          f"{args.repeat} interleaved rounds" + (f"; ours with --set {' '.join(args.set)}" if args.set else ""))
    held = next(iter(results.values()))["held_out"]["pairs"]
    print(f"held-out: {held} pairs, each final adapter scored by the same function (fp32, reference = base)\n")
    print(f"{'':13}{'precision':>10}{'tokens/s':>10}{memory_name:>13}{'wall s':>9}{'trained tokens':>16}"
          f"{'final loss':>12}{'held-out acc':>14}{'margin':>9}{'held-out loss':>15}")
    for role, r in results.items():
        h = r["held_out"]
        print(f"{role:13}{precisions[role]:>10}{r['rate']:>10.0f}{r['memory_mb']:>13.0f}{r['wall_s']:>9.1f}"
              f"{r['trained']:>16}{r['losses'][-1]:>12.4f}{h['reward_accuracy']:>14.1%}{h['reward_margin']:>9.4f}"
              f"{h['dpo_loss']:>15.4f}   rounds: " + " ".join(f"{x:.0f}" for x in r["rates"]) + " tok/s, "
              + " ".join(f"{x:.0f}" for x in r["memory_rounds"]) + " MB"
              + (f"; reference precompute {r['precompute_s']:.1f} s, charged to the steps" if r.get("precompute_s")
                 else ""))
    others = {role: r["others_rounds"] for role, r in results.items() if None not in r["others_rounds"]}
    if others:
        print("other work on the machine during each round (cores taken by other processes and hypervisor steal): "
              + "; ".join(f"{role} " + " ".join(f"{x:.2f}" for x in xs) for role, xs in others.items()))
        if max(max(xs) for xs in others.values()) > common.BUSY_CORES:
            print(f"  rounds above {common.BUSY_CORES} cores are not comparable (BENCHMARKS.md)")
    if "ours" not in results:
        return
    ours = results["ours"]
    for role in (r for r in results if r != "ours"):
        peer = results[role]
        accuracy = ours["held_out"]["reward_accuracy"] - peer["held_out"]["reward_accuracy"]
        line = (f"\nours vs {role}: speed x{ours['rate'] / peer['rate']:.2f}, {memory_name[:-3]} x"
                f"{ours['memory_mb'] / peer['memory_mb']:.2f}, wall x{ours['wall_s'] / peer['wall_s']:.2f}, "
                f"held-out reward accuracy {100 * accuracy:+.1f} points, "
                f"margin {ours['held_out']['reward_margin']:.4f} vs {peer['held_out']['reward_margin']:.4f}")
        if len(ours["rates"]) > 1:
            line += "; speed per round x" + " x".join(f"{a / b:.2f}" for a, b in zip(ours["rates"], peer["rates"]))
        print(line)
