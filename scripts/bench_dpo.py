#!/usr/bin/env python
"""DPO step time: finetune's `train.method: dpo` against TRL's DPOTrainer, and against finetune's own supervised step.

    python scripts/bench_dpo.py [--steps 10] [--warmup 2] [--batch 4] [--hidden 256] [--layers 4] [--work DIR]

Needs TRL (`pip install trl`). Builds a tiny Llama locally (finetune.tiny, random weights), takes the shipped
preference pairs (finetune/assets/preferences.jsonl, repeated to fill the steps), and runs, each in its own
process, in fp32 (`--precision auto`: ours in finetune's own choice): ours (the real
`finetune train` command with method dpo), TRL's DPOTrainer with the same LoRA (r 16, alpha 32, all linear
layers), batch of pairs, learning rate and steps, and ours again as supervised training on prompt + chosen answer
(the same rows, half the sequences). It prints the median seconds per step over the steps after the warm-up, the
real tokens per second, and each process's peak memory. A step of DPO does a reference forward without gradients
and a forward and backward over twice the sequences of a supervised step: expect a little over twice its time.
Like every timing here, figures from a machine shared with other work are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32}
LR = 5e-5


def _pairs(work: Path, rows: int) -> Path:
    lines = (ROOT / "finetune" / "assets" / "preferences.jsonl").read_text().splitlines()
    source = [json.loads(line) for line in lines]
    pairs = [source[i % len(source)] for i in range(rows)]
    path = work / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    sft = work / "chosen.jsonl"
    sft.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n" for p in pairs))
    return path


def _child(cmd: list[str]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_ours(model: Path, data: Path, work: Path, method: str, steps: int, batch: int, precision: str) -> dict:
    home = work / f"registry-{method}"
    cfg = work / f"{method}.yaml"
    cfg.write_text(json.dumps({
        "base_model": str(model), "destination": f"bench/{method}",
        "data": {"path": str(data), "max_seq_len": 256},
        "lora": {**LORA, "target_modules": "all-linear"},
        "train": {"method": method, "max_steps": steps, "batch_size": batch, "lr": LR, "seed": 0,
                  "scheduler": "constant", "packing": False, "precision": precision},
    }))
    _child([sys.executable, "-m", "finetune", "--registry", str(home), "train", str(cfg), "--create-destination",
            "--quiet"])
    from finetune.registry import Registry
    from finetune.registry.jobs import Trainings
    from finetune.training.metrics import MetricsLog

    registry = Registry(home)
    version, trainings = registry.resolve(f"bench/{method}"), Trainings(registry)
    rows = MetricsLog(trainings.paths(version.metadata["training_id"]).metrics).read()
    summary = trainings.get(version.metadata["training_id"]).metrics
    return {"steps": [(r["time_s"], r["tokens"]) for r in rows], "peak_mb": summary["peak_memory_mb"]}


def trl_main(model: str, data: str, out: str, steps: int, batch: int) -> None:
    """The TRL side, in its own process: DPOTrainer over the same pairs, step end times recorded."""
    import resource

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[tuple[float, int]] = []
    start = [0.0]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            start[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter() - start[0], int(state.num_input_tokens_seen or 0)))

    tok = AutoTokenizer.from_pretrained(model)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    args = DPOConfig(output_dir=str(Path(out).parent / "trl-out"), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=LR, lr_scheduler_type="constant", report_to=[], save_strategy="no", seed=0,
                     logging_steps=1, use_cpu=not torch.cuda.is_available(), max_length=256, bf16=False, fp16=False)
    trainer = DPOTrainer(model=base, args=args, train_dataset=load_dataset("json", data_files=data, split="train"),
                         processing_class=tok, callbacks=[Clock()],
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"steps": times, "peak_mb": peak}))


def per_step(steps: list, warmup: int) -> float:
    ends = [t for t, _ in steps]
    return statistics.median(b - a for a, b in zip(ends[warmup:], ends[warmup + 1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "auto"),
                        help="ours only (auto: finetune's choice, bf16 where the device does it); TRL runs fp32")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    total = args.warmup + args.steps + 1
    if args.role == "trl":
        trl_main(*args.paths, steps=total, batch=args.batch)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    from finetune.tiny import build_tiny_model

    model = build_tiny_model(work / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=4)
    pairs = _pairs(work, total * args.batch)
    results = {"ours dpo": run_ours(model, pairs, work, "dpo", total, args.batch, args.precision),
               "ours sft (chosen)": run_ours(model, work / "chosen.jsonl", work, "sft", total, args.batch,
                                             args.precision)}
    out = work / "trl.json"
    _child([sys.executable, __file__, "--role", "trl", "--batch", str(args.batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--paths", str(model), str(pairs), str(out)])
    results["trl dpo"] = json.loads(out.read_text())
    print(f"{args.steps} timed steps of {args.batch} pairs after {args.warmup} warm-up, tiny Llama hidden "
          f"{args.hidden} x {args.layers} layers, LoRA r {LORA['r']} on all linear layers")
    for name, r in results.items():
        seconds = per_step(r["steps"], args.warmup)
        print(f"  {name:18s} {seconds * 1000:8.1f} ms/step   peak {r['peak_mb']:7.0f} MiB")
    dpo, sft, trl = (per_step(results[k]["steps"], args.warmup) for k in ("ours dpo", "ours sft (chosen)", "trl dpo"))
    print(f"  ours dpo / ours sft: {dpo / sft:.2f}x   trl dpo / ours dpo: {trl / dpo:.2f}x")


if __name__ == "__main__":
    main()
