#!/usr/bin/env python
"""Training throughput and memory: finetune against the Hugging Face Trainer + PEFT, side by side, in one run.

    python scripts/bench_train.py [--source ../shared/data/alpaca_5000.json] [--data alpaca|long|text]
                                  [--vocab 8k|32k|128k] [--steps 30] [--warmup 3] [--rows N]
                                  [--arch llama|qwen2|gpt2|stablelm|falcon|bloom] [--precision auto|fp32|bf16]
                                  [--isa native|avx2]
                                  [--set KEY=VALUE ...] [--method sft|dpo]

Runs, one after the other, each in its own process (so peak memory is each contender's own):
  1. ours         the real `finetune train` command, with its defaults but for the precision;
  2. peer-default Trainer + get_peft_model with the Trainer's defaults: random sampling, padding to the longest
                  in the batch, fp32 (whatever --precision says: that is what a user who sets nothing gets);
  3. peer-tuned   the same with train_sampling_strategy="group_by_length" and the precision a sensible user
                  picks: with --precision auto, bf16 only where the device does it natively (a GPU, a CPU with
                  AVX512-BF16 or AMX), else fp32, where emulated bf16 would be many times slower.
--precision sets ours and the tuned peer alike (auto: finetune's own choice, which is the rule above); on a
bf16 machine `--precision fp32` reproduces the fp32-only case. `--isa avx2` caps every library at AVX2 in every
process (ATen's kernels, oneDNN, MKL), as on a CPU without AVX-512 (a laptop, an older server), where fp32 is
what `auto` picks. `--set KEY=VALUE` changes ours alone (a `finetune train --set` override; `train.packing=false`
measures the padded path that models which cannot be packed take). The machine's capability (CPU model, native
bf16 or not, measured bf16 and fp32 matmul rates; fp32 on a CPU through torch's default library and through
oneDNN, which finetune's fp32 products take on x86) is printed with the results, and each contender's speed as
a share of the matmul peak of the precision it ran in (for fp32 the better library's).
Same model (one of the tiny architectures of finetune.tiny, or of PADDED_FAMILIES, built locally with random
weights, ~30M parameters, see ARCH_MODELS; vocabulary 8192 from one BPE tokenizer trained on the data and shared by
every architecture), same tokenized data and prompt masking (finetune's data layer encodes it once for everybody),
LoRA r 16 / alpha 32 on all linear layers, batch 8, max length 512, lr 2e-4, the same number of steps over the same
rows: by default one epoch of (warmup + steps) x 8 rows, which each contender orders its own way, so the speed is
taken over the epoch but for its first step (with `--rows 0`, all 4,800 rows, each sampler picks which rows its
steps see, and the tuned peer's length grouping picks its longest first: its timed steps then saw ~20% more tokens
per step than ours). It prints real (non-padding) tokens/s over the timed steps, peak memory (resident on a CPU;
allocated GPU memory on CUDA), wall time of the whole process, three losses (the training loss at equal trained
tokens: token-weighted mean over the first N tokens, N = the fewest any contender trained; the held-out loss of each
final adapter, every contender having trained the same number of steps of 8 examples; and the held-out loss at equal
trained tokens: each peer's adapter saved at the first step at which it has trained as many tokens as ours did in
all its steps), our ratios, and the machine's measured bf16/fp32 matmul rates (on the GPU when there is one). On
Linux it also prints, per round, how many cores other processes and the hypervisor took meanwhile: a round beside
other work is not comparable (PyTorch's threads spin while they wait for each other, and a shared core stalls them).
`--data` picks the data built from the source file (alpaca rows as they are; `long`: the rows with the longest
answers; `text`: rows joined into documents, trained with format text, so every token carries loss) and `--vocab`
the model's vocabulary (the 8k tokenizer's model widened to that many embedding rows): see scripts/bench_data.py.
The share of tokens that carry loss is printed with the results.
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

import bench_data  # scripts/: beside this file, on sys.path when it runs as a script

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_5000.json"
# ~30M parameters each. Qwen2: grouped-query attention (2 key/value heads), q/k/v biases, untied head; GPT-2:
# Conv1D projections, LayerNorm, GELU MLP of 4 x hidden, learned positions, tied head.
ARCH_MODELS = {
    "llama": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376),
    "qwen2": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1376),
    "gpt2": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
}
# Families that cannot be packed, so they train on padded batches (finetune's `packing: auto` finds that when it
# loads them): the same sizes, built from transformers' own configs. Bloom's MLP is 4 x hidden whatever it is told.
PADDED_FAMILIES = {"stablelm": {}, "falcon": dict(new_decoder_architecture=True), "bloom": {}}
VOCAB = 8192
LORA = dict(r=16, alpha=32)  # dropout: each side's default (0 in peft and in finetune)
BATCH, MAX_LEN, LR, SEED = 8, 512, 2e-4, 42
BUSY_CORES = 0.1  # other work during a round above this is flagged: see _timed_child and BENCHMARKS.md
# What a CPU without AVX-512 can run, for every library torch calls; read when torch loads, so set before that and
# inherited by every contender's process.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


# ---------------------------------------------------------------- set-up shared by all contenders
def build_inputs(data: Path, work: Path, arch: str, kind: str = "alpaca", vocab: str = "8k") -> dict:
    """The base model folder, the train/eval split files of data set ``kind``, in ``work`` (reused when already
    there). Every architecture's model shares one tokenizer, trained once on the source rows, so the tokenized data
    are the same; ``vocab`` widens the model's embedding (scripts/bench_data.py)."""
    from transformers import AutoTokenizer

    from finetune.tiny import alpaca_texts, build_tiny_model, train_tokenizer

    records = json.loads(data.read_text())
    train, held_out = bench_data.split(bench_data.build_records(records, kind), bench_data.HELD_OUT[kind])
    paths = {"model": work / f"base-{arch}-{vocab}", "train": work / f"{kind}-train.jsonl",
             "eval": work / f"{kind}-eval.jsonl", "tokenizer": work / "tokenizer"}
    if not (paths["tokenizer"] / "tokenizer.json").exists():
        train_tokenizer(alpaca_texts(records), vocab_size=VOCAB).save_pretrained(paths["tokenizer"])
    if not paths["train"].exists():
        for key, rows in (("train", train), ("eval", held_out)):
            bench_data.write_jsonl(paths[key], rows)
    if not (paths["model"] / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
        if arch in ARCH_MODELS:
            build_tiny_model(paths["model"], tokenizer, arch=arch, seed=SEED, max_position_embeddings=1024,
                             **ARCH_MODELS[arch])
        else:
            _build_family(paths["model"], tokenizer, arch)
        bench_data.widen_vocabulary(paths["model"], bench_data.VOCABS[vocab], SEED)
    return {k: str(v) for k, v in paths.items()} | {"format": bench_data.FORMATS[kind]}


def _build_family(out: Path, tokenizer, family: str) -> None:
    """One of PADDED_FAMILIES at the Llama's sizes (hidden 512, 8 layers, 8 heads, MLP 1376), random init."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    sizes = ARCH_MODELS["llama"]
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), hidden_size=sizes["hidden_size"], num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_heads"], num_key_value_heads=sizes["num_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=sizes["hidden_size"] ** -0.5,
        **special, **PADDED_FAMILIES[family])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def capability() -> dict:
    """What the machine does natively: the CPU's model and bf16 support, or the GPU's name."""
    import platform

    import torch

    from finetune.modeling.precision import choose_precision

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(), "native_bf16": torch.cuda.is_bf16_supported(),
                "kind": "GPU", "auto": choose_precision("auto", torch.device("cuda"))}
    flags, model = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name":
                model = value.strip()
    except OSError:
        pass
    native = choose_precision("auto", torch.device("cpu")) == "bf16"
    isa = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    capped = all(os.environ.get(k) == v for k, v in AVX2_ONLY.items())
    kind = ("native bf16 (" + ", ".join(isa or ["oneDNN says so"]) + ")" if native else
            "no native bf16 (" + ("AVX2 only, capped by --isa avx2" if capped else "AVX512 only" if "avx512f" in flags
                                  else "AVX2 only" if "avx2" in flags else "no AVX2")
            + ": bf16 is emulated)")
    return {"device": f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
                      f"{torch.backends.cpu.get_cpu_capability()} kernels", "native_bf16": native, "kind": kind,
            "auto": choose_precision("auto", torch.device("cpu"))}


def tokenized(paths: dict, cache: Path):
    """The data exactly as finetune encodes it (alpaca: loss on completions only; text: on every token)."""
    from transformers import AutoTokenizer

    import finetune.data.prepare as preparing

    tok, fmt = AutoTokenizer.from_pretrained(paths["model"]), paths.get("format", "alpaca")
    train = preparing.prepare(paths["train"], fmt, tok, max_seq_len=MAX_LEN, train_on_inputs=False,
                         cache_dir=str(cache)).train
    held_out = preparing.prepare(paths["eval"], fmt, tok, max_seq_len=MAX_LEN, train_on_inputs=False,
                            cache_dir=str(cache)).train
    return tok, train, held_out


def matmul_rates(native_bf16: bool) -> dict:
    """Measured GFLOP/s of a square matmul in bf16 and fp32, on the GPU when there is one (what trains there).

    On a CPU fp32 is measured twice, through torch's default library (MKL on x86) and through oneDNN, which
    finetune uses for its own fp32 products there; the fp32 peak is the better of the two. Emulated bf16 is
    measured on a 512^2 matrix: at 2048^2 it takes minutes."""
    import torch

    cuda = torch.cuda.is_available()
    size, n = (8192, 20) if cuda else (2048, 6)
    out = {}
    runs = [("bf16", torch.bfloat16, torch.matmul, size if native_bf16 or cuda else 512),
            ("fp32", torch.float32, torch.matmul, size)]
    if not cuda:
        from finetune.modeling.ops import gemm

        if gemm.onednn_available():
            runs.append(("fp32-onednn", torch.float32,
                         lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], ""), size))
    for name, dtype, mm, side in runs:
        a, b = (torch.randn(side, side, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
        for _ in range(2):
            mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        out[name] = 2 * side**3 * n / (time.perf_counter() - t) / 1e9
    out["fp32-default"] = out["fp32"]
    out["fp32"] = max(out["fp32"], out.get("fp32-onednn", 0.0))
    return out


# ---------------------------------------------------------------- contenders (each in its own process)
def run_ours(paths: dict, steps: int, work: Path, precision: str, overrides: list[str] = ()) -> dict:
    """The real `finetune train` CLI with default settings (bar the shared benchmark parameters and ``overrides``,
    ``--set`` arguments of the CLI)."""
    home = work / "registry-ours"
    env = dict(os.environ, FINETUNE_HOME=str(home), HF_HUB_OFFLINE="1")
    cfg = work / "ours.yaml"
    cfg.write_text(json.dumps({
        "base_model": paths["model"], "destination": "bench/ours",
        "data": {"path": paths["train"], "format": paths.get("format", "alpaca"), "max_seq_len": MAX_LEN},
        "lora": {**LORA, "target_modules": "all-linear"},  # everything else: our defaults
        "train": {"max_steps": steps, "batch_size": BATCH, "lr": LR, "seed": SEED, "precision": precision},
    }))
    cmd = [sys.executable, "-m", "finetune", "train", str(cfg), "--create-destination", "--quiet",
           *(arg for item in overrides for arg in ("--set", item))]
    result = _timed_child(cmd, env)
    if result["returncode"] != 0:
        raise SystemExit(f"ours failed:\n{result['stderr'][-3000:]}")
    from finetune.registry import Registry
    from finetune.registry.jobs import Trainings
    from finetune.training.metrics import MetricsLog

    registry = Registry(home)
    version, trainings = registry.resolve("bench/ours"), Trainings(registry)
    rows = MetricsLog(trainings.paths(version.metadata["training_id"]).metrics).read()
    summary = trainings.get(version.metadata["training_id"]).metrics
    return {**result, "steps": [(r["time_s"], r["tokens"]) for r in rows], "losses": [r["loss"] for r in rows],
            "adapter": str(version.path),
            "gpu_peak_mb": summary["peak_memory_mb"] if summary["device"] == "cuda" else None}


def peer_main(args: argparse.Namespace) -> None:
    """Child process: the Hugging Face Trainer + PEFT, default or tuned."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    paths = json.loads(args.paths)
    tok, train, _ = tokenized(paths, Path(args.work) / "cache")
    train = train.remove_columns([c for c in train.column_names if c not in ("input_ids", "labels")])
    tuned = args.role == "peer-tuned"
    bf16 = tuned and args.precision == "bf16"  # the default peer keeps the Trainer's default, fp32
    counted = []

    def collate(rows):
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        counted.append(int(mask.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    marks = []
    at_budget: dict = {}
    clock = {"start": 0.0, "paused": 0.0}

    class Clock(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            clock["start"] = time.perf_counter()  # the clock starts with the loop, as ours does


        def on_step_end(self, targs, state, control, **kwargs):
            # The data loader collates one batch ahead: the tokens trained are those of the first global_step
            # batches, not all batches collated so far.
            trained = sum(counted[: state.global_step])
            marks.append((time.perf_counter() - clock["start"] - clock["paused"], trained))
            if args.budget and trained >= args.budget and not at_budget:
                t = time.perf_counter()  # saving is not training: kept off the clock
                at_budget.update(adapter=str(Path(args.work) / f"{args.role}-adapter-at-budget"), tokens=trained)
                model.save_pretrained(at_budget["adapter"])
                clock["paused"] += time.perf_counter() - t

    # transformers' default attention, as a user gets it: SDPA where the model has it (eager for Bloom, say)
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                             task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2"))
    targs = TrainingArguments(
        output_dir=str(Path(args.work) / args.role), per_device_train_batch_size=BATCH, learning_rate=LR,
        max_steps=args.steps, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to=[],
        seed=SEED, bf16=bf16, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        remove_unused_columns=False, train_sampling_strategy="group_by_length" if tuned else "random",
        max_grad_norm=1.0, disable_tqdm=True,
    )
    if tuned:
        train = train.add_column("length", [len(x) for x in train["input_ids"]])
        targs.length_column_name = "length"
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collate, callbacks=[Clock()])
    trainer.train()
    adapter = Path(args.work) / f"{args.role}-adapter"
    model.save_pretrained(adapter)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    print(json.dumps({"steps": marks, "losses": losses, "adapter": str(adapter),
                      "at_budget": at_budget, "gpu_peak_mb": gpu_peak}), flush=True)


def run_peer(role: str, paths: dict, steps: int, work: Path, budget: int | None, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--role", role, "--paths", json.dumps(paths), "--steps", str(steps),
           "--work", str(work), "--budget", str(budget or 0), "--precision", precision]
    result = _timed_child(cmd, dict(os.environ, HF_HUB_OFFLINE="1"))
    if result["returncode"] != 0:
        raise SystemExit(f"{role} failed:\n{result['stderr'][-3000:]}")
    return {**result, **json.loads(result["stdout"].strip().splitlines()[-1])}


def _timed_child(cmd: list[str], env: dict) -> dict:
    """Run a child; return its wall time, peak RSS (from wait4's rusage), output, and how many cores other work
    took meanwhile (``others_cores``: other processes plus the hypervisor's steal; None off Linux)."""
    start, cpu_before = time.perf_counter(), _machine_cpu_s()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall, cpu_after = time.perf_counter() - start, _machine_cpu_s()
        proc.returncode = os.waitstatus_to_exitcode(status)
        others = None
        if cpu_before and cpu_after:  # this process only waits meanwhile: what the child did not use, others did
            busy, steal = (after - before for after, before in zip(cpu_after, cpu_before))
            others = max(0.0, busy - usage.ru_utime - usage.ru_stime) / wall + steal / wall
        out.seek(0), err.seek(0)
        return {"returncode": proc.returncode, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024,
                "others_cores": others, "stdout": out.read().decode(), "stderr": err.read().decode()}


def _machine_cpu_s() -> tuple[float, float] | None:
    """CPU seconds the whole machine has run (all processes) and lost to the hypervisor (steal) since boot, from
    Linux's /proc/stat; None elsewhere."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


# ---------------------------------------------------------------- judging
def timed_rate(steps: list, warmup: int) -> tuple[float, int]:
    """Real tokens per second over the steps after the warm-up (over every step, from the loop's start, when
    ``warmup`` is 0), and all tokens trained."""
    (t0, n0), (t1, n1) = steps[warmup - 1] if warmup else (0.0, 0), steps[-1]
    return (n1 - n0) / (t1 - t0), n1


def train_loss_at(steps: list, losses: list, budget: int) -> float:
    """Token-weighted mean training loss over the steps that trained the first ``budget`` tokens."""
    total = weight = 0.0
    previous = 0
    for (_, tokens), loss in zip(steps, losses):
        take = min(tokens, budget) - previous
        if take <= 0:
            break
        total, weight, previous = total + loss * take, weight + take, previous + take
    return total / weight


def held_out_loss(paths: dict, adapter: str, work: Path) -> float:
    """Token-weighted loss of a final adapter on the held-out rows, the same code and tokens for everyone."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.data.batching import collate_padded, pad_id
    from finetune.modeling.load import attach_lora
    from finetune.modeling.ops.loss import CausalLMLoss

    tok, _, held_out = tokenized(paths, work / "cache")
    model = attach_lora(AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32), None,
                        adapter_dir=adapter, trainable=False)
    loss_model = CausalLMLoss(model).eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(held_out), BATCH):
            rows = [held_out[j] for j in range(i, min(i + BATCH, len(held_out)))]
            batch = collate_padded(rows, pad_id(tok))  # padded: exact for every model, packable or not
            s, n = loss_model(**batch)
            total, count = total + float(s), count + float(n)
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_DATA, help="the Alpaca rows the data are built from")
    parser.add_argument("--data", choices=bench_data.KINDS, default="alpaca",
                        help="long: the rows with the longest answers; text: rows joined into documents")
    parser.add_argument("--vocab", choices=tuple(bench_data.VOCABS), default="8k",
                        help="the model's vocabulary: the 8k tokenizer's embedding widened to that many rows")
    parser.add_argument("--arch", choices=(*ARCH_MODELS, *PADDED_FAMILIES), default="llama",
                        help="the tiny base model's architecture (stablelm, falcon, bloom: ones that train padded)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="ours and the tuned peer alike; auto: bf16 only where the device does it natively")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: every process runs as on a CPU without AVX-512 (no native bf16 either)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=None,
                        help="train on the first ROWS rows of the training split (default: one epoch of the run, "
                             "(warmup + steps) x batch, the same rows for every contender; 0: all rows)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--only", nargs="*", default=["ours", "peer-default", "peer-tuned"])
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of all contenders, interleaved; speed and memory are the medians")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for ours only (finetune train --set), e.g. train.packing=false")
    parser.add_argument("--method", choices=("sft", "dpo"), default="sft",
                        help="dpo: preference training against TRL's DPOTrainer (scripts/bench_dpo.py)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.isa == "avx2":
        os.environ.update(AVX2_ONLY)
    import torch  # after the ISA cap: the libraries read it when they load

    if args.method == "dpo":
        import bench_dpo

        return bench_dpo.main(args)
    if args.role:
        return peer_main(args)
    if not args.source.exists():
        raise SystemExit(f"data file {args.source} not found (pass --source PATH)")
    work = args.work or Path(tempfile.mkdtemp(prefix="ft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    total_steps = args.steps + args.warmup
    paths = build_inputs(args.source, work, args.arch, args.data, args.vocab)
    rows = total_steps * BATCH if args.rows is None else args.rows
    if rows:
        subset = work / f"train-{rows}.jsonl"
        subset.write_text("".join(Path(paths["train"]).read_text().splitlines(keepends=True)[:rows]))
        paths["train"] = str(subset)
    # Over one epoch every contender trains the same rows, but each orders them its own way (the tuned peer's
    # length grouping runs them longest first), so a window short of the epoch compares different rows. Only the
    # first step is left out: it holds one-time costs (the peer's first step took ~7 s against ~1-2 s for ours on
    # Llama), which a real epoch of hundreds of steps amortises. Both run their largest batch first (length
    # grouping; our plan), so each grows its memory to its peak in that step.
    warmup = 1 if rows == total_steps * BATCH else args.warmup
    # encode once up front; every contender then reads the same cache
    share = bench_data.loss_share(tokenized(paths, work / "cache")[1])
    cap = capability()
    precision = cap["auto"] if args.precision == "auto" else args.precision
    precisions = {"ours": precision, "peer-default": "fp32", "peer-tuned": precision}
    # The peak is the best of several readings, one before the runs and one after each: a single reading on a
    # shared machine swung 150-230 GFLOP/s in fp32 (BENCHMARKS.md), and a share of it followed the reading.
    readings = [matmul_rates(cap["native_bf16"])]
    # On a GPU what limits a run is the device's memory (allocated peak); on a CPU, the process's resident peak.
    memory, memory_name = (("gpu_peak_mb", "peak GPU MB") if torch.cuda.is_available()
                           else ("peak_rss_mb", "peak RSS MB"))
    results = {}
    # Interleaved rounds, medians: on a shared machine one run of a contender can be 10-20% off.
    rounds: dict[str, list[dict]] = {role: [] for role in args.only}
    # Loss at equal tokens: each peer keeps its adapter from the step at which it has trained as many tokens as
    # ours did in all its steps (a peer that runs before ours in the first round learns that count in the next).
    ours_tokens = None
    for i in range(args.repeat):
        for role in args.only:
            print(f"round {i + 1}/{args.repeat}: {role} ...", flush=True)
            run = (run_ours(paths, total_steps, work, precision, args.set) if role == "ours" else
                   run_peer(role, paths, total_steps, work, ours_tokens, precisions[role]))
            run["rate"], run["trained"] = timed_rate(run["steps"], warmup)
            if role == "ours":
                ours_tokens = run["trained"]
            rounds[role].append(run)
            readings.append(matmul_rates(cap["native_bf16"]))
    rates = {key: max(reading[key] for reading in readings) for key in readings[0]}
    for role, runs in rounds.items():
        r = dict(runs[0])  # training is seeded: every round trains the same tokens to the same adapter
        r["rates"] = [run["rate"] for run in runs]
        r["others_rounds"] = [run["others_cores"] for run in runs]
        r["memory_rounds"] = [run[memory] for run in runs]
        r["rate"] = statistics.median(r["rates"])
        r["memory_mb"] = statistics.median(r["memory_rounds"])
        r["wall_s"] = statistics.median(run["wall_s"] for run in runs)
        r["loss"] = held_out_loss(paths, r["adapter"], work)
        at_budget = next((run["at_budget"] for run in runs if run.get("at_budget")), None)
        if role == "ours":
            r["loss_at_budget"], r["tokens_at_budget"] = r["loss"], r["trained"]
        elif at_budget:
            r["loss_at_budget"] = held_out_loss(paths, at_budget["adapter"], work)
            r["tokens_at_budget"] = at_budget["tokens"]
        elif ours_tokens and r["trained"] < ours_tokens:  # never reached ours' count: its final adapter is closest
            r["loss_at_budget"], r["tokens_at_budget"] = r["loss"], r["trained"]
        results[role] = r

    budget = min(r["trained"] for r in results.values())
    for r in results.values():
        r["train_loss_at_budget"] = train_loss_at(r["steps"], r["losses"], budget)
    flop_per_token = 4 * _matmul_params(paths["model"])
    capped = " (--isa avx2: " + ", ".join(f"{k}={v}" for k, v in AVX2_ONLY.items()) + ")"
    print(f"\nmachine: {cap['device']}; {cap['kind']}; --precision {args.precision} -> {precision}"
          + (capped if args.isa == "avx2" else ""))
    fp32 = (f"fp32 {rates['fp32-default']:.0f} GFLOP/s (torch's default), {rates['fp32-onednn']:.0f} (oneDNN)"
            if "fp32-onednn" in rates else f"fp32 {rates['fp32']:.0f} GFLOP/s")
    bf16_side = "" if cap["native_bf16"] or torch.cuda.is_available() else " (emulated, at 512^2)"
    spread = min(reading[precision] for reading in readings)
    print(f"matmul peaks (2048^2, the best of {len(readings)} readings, before the runs and after each; {precision}'s "
          f"lowest {spread:.0f} GFLOP/s): bf16 {rates['bf16']:.0f} GFLOP/s{bf16_side}, {fp32}; 'of peak' is "
          f"of the better of its precision; model: {args.arch}, ~{flop_per_token / 1e6:.0f} MFLOP per trained token "
          "(frozen base: forward + input gradients)")
    timed = (f"{total_steps} steps, one epoch over the same {rows} rows for everyone, timed after each one's first"
             f" step" if rows == total_steps * BATCH else f"{args.steps} timed steps after {warmup} warm-up over "
             + (f"{rows} rows" if rows else "all rows"))
    print(f"{timed}, batch {BATCH}, max length {MAX_LEN}; medians of {args.repeat} interleaved rounds")
    print(f"data: {args.data} (format {paths['format']}), vocabulary {bench_data.VOCABS[args.vocab]}; "
          f"{share:.0%} of the training tokens carry loss")
    if args.set:
        print(f"ours with {' '.join(f'--set {item}' for item in args.set)}")
    print("loss columns: mean training loss over the first N trained tokens (N = the fewest any contender trained);"
          " held-out loss after the same steps; held-out loss at equal tokens (@ours: each peer's adapter from the"
          " first step at which it had trained as many tokens as ours did in all its steps)\n")
    print(f"{'':13}{'precision':>10}{'tokens/s':>10}{'of peak':>9}{memory_name:>13}{'wall s':>9}{'trained tokens':>16}"
          f"{'train loss @N':>15}{'held-out':>10}{'held-out @ours':>16}{'loss share':>12}")
    for role, r in results.items():
        frac = r["rate"] * flop_per_token / (rates[precisions[role]] * 1e9)  # of the peak of its own precision
        at_n = f"{r['loss_at_budget']:.4f}" if "loss_at_budget" in r else "n/a"
        print(f"{role:13}{precisions[role]:>10}{r['rate']:>10.0f}{frac:>8.0%} {r['memory_mb']:>12.0f}"
              f"{r['wall_s']:>9.1f}{r['trained']:>16}"
              f"{r['train_loss_at_budget']:>15.4f}{r['loss']:>10.4f}{at_n:>16}{share:>12.0%}   rounds: "
              + " ".join(f"{x:.0f}" for x in r["rates"]) + " tok/s, "
              + " ".join(f"{x:.0f}" for x in r["memory_rounds"]) + " MB")
    others = {role: r["others_rounds"] for role, r in results.items() if None not in r["others_rounds"]}
    if others:
        print("other work on the machine during each round (cores taken by other processes and hypervisor steal): "
              + "; ".join(f"{role} " + " ".join(f"{x:.2f}" for x in xs) for role, xs in others.items()))
        if max(max(xs) for xs in others.values()) > BUSY_CORES:
            print(f"  rounds above {BUSY_CORES} cores are not comparable: with a core shared, PyTorch's spinning "
                  "OpenMP threads lose up to 5x, and one side more than the other (BENCHMARKS.md)")
    print(f"N = {budget} tokens; held-out @ours taken at " + ", ".join(
        f"{r['tokens_at_budget']} tokens ({role})" for role, r in results.items() if "tokens_at_budget" in r))
    if "ours" in results:
        ours = results["ours"]
        for role in (r for r in results if r != "ours"):
            peer = results[role]
            line = (f"\nours vs {role}: speed x{ours['rate'] / peer['rate']:.2f}, {memory_name[:-3]} x"
                    f"{ours['memory_mb'] / peer['memory_mb']:.2f}, wall x{ours['wall_s'] / peer['wall_s']:.2f}, "
                    f"train loss @N {_pct(ours['train_loss_at_budget'], peer['train_loss_at_budget'])}, "
                    f"held-out after the same steps {_pct(ours['loss'], peer['loss'])}")
            if "loss_at_budget" in peer:
                line += f", held-out at equal tokens {_pct(ours['loss_at_budget'], peer['loss_at_budget'])}"
            if len(ours["rates"]) > 1:  # the rounds ran in pairs, back to back: their spread is the noise
                pairs = zip(ours["rates"], peer["rates"])
                line += "; speed per round x" + " x".join(f"{a / b:.2f}" for a, b in pairs)
            print(line)
    (work / "results.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("stdout", "stderr")}
                                                   for k, v in results.items()}
                                                | {"matmul": rates, "matmul_readings": readings, "capability": cap,
                                                   "arch": args.arch, "data": args.data, "vocab": args.vocab,
                                                   "loss_share": share,
                                                   "precisions": {k: precisions[k] for k in results}}, indent=2))
    print(f"\ndetails: {work / 'results.json'}")


def _pct(ours: float, peer: float) -> str:
    return f"{100 * (ours / peer - 1):+.2f}%"


def _matmul_params(model_dir: str) -> int:
    """Weights that take part in a matmul per token: the decoder's projections and the output layer (counted from
    the model built on the meta device, so any family counts right)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))


if __name__ == "__main__":
    main()
