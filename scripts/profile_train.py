#!/usr/bin/env python
"""Where a training step's time goes: the real ``finetune train`` under PyTorch's profiler, grouped.

    python scripts/profile_train.py CONFIG.yaml [--skip 4] [--steps 10] [--isa native|avx2] [--set KEY=VALUE ...]
                                    [--table N] [--threads N] [--peer]

Runs ``finetune train CONFIG.yaml`` in this process, into a throwaway registry, and profiles optimizer steps
``skip+1 .. skip+steps`` (the config must train at least that many). ``--peer``: profiles the tuned peer of
``scripts/bench_train.py`` (Trainer + PEFT, length grouping) instead, on the same model, data, maximum length, steps
and precision (CONFIG's; ``--set`` does not apply to it), so that the two can be set side by side group by group.
``--threads N``: torch's intra-op threads (default: torch's own choice); on a machine shared with other work, 1
keeps the shares honest: with more threads than free cores, every parallel operator waits at its barrier for a
thread the scheduler has put aside, and small operators (copies, element-wise passes) swell by 10x.
Operators are grouped by what they compute, from their names and shapes:
  frozen products  matrix products of the base model's weights: forward and input gradient (no dimension = r)
  rank-r products  LoRA's own products, each with one dimension equal to the rank r (x @ A.T, its gradients...)
  attention        the score and value products, softmax and its backward, SDPA's kernels
  everything else  norms, activations, RoPE, residual adds, the loss, the optimizer, copies, bookkeeping
with each group's share of the profiled operators' time, and the products' rate in GFLOP/s (2·m·k·n per product),
to set against the machine's matmul peak (``scripts/bench_train.py`` prints it). ``--table N``: PyTorch's own
table of the N operators that took longest, too. The profiler adds a few percent of overhead to small operators.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict

PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise"}
ATTENTION = ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::_softmax_backward_data",
             "aten::_scaled_dot_product")  # the last: a prefix of SDPA's CPU kernels, forward and backward


def product_dims(name: str, shapes: list) -> tuple[int, int, int] | None:
    """(m, k, n) of a 2-d matrix product from its recorded input shapes, None if they are not those of one."""
    try:
        if name == "mkldnn::_linear_pointwise":  # input [m, k], weight [n, k]
            (m, k), (n, _) = shapes[0], shapes[1]
        elif name == "aten::mm":  # [m, k] @ [k, n]
            (m, k), (_, n) = shapes[0], shapes[1]
        else:  # addmm(_): self, [m, k], [k, n]
            (m, k), (_, n) = shapes[1], shapes[2]
    except (IndexError, TypeError, ValueError):
        return None
    return m, k, n


def group(name: str, shapes: list, rank: int) -> tuple[str, float]:
    """The group an operator falls in, and its FLOPs when it is a matrix product (else 0)."""
    if name in PRODUCTS:
        dims = product_dims(name, shapes)
        if dims is not None:
            m, k, n = dims
            return ("rank-r products" if rank in dims else "frozen products"), 2.0 * m * k * n
    if name.startswith(ATTENTION):
        return "attention", 0.0
    return "everything else", 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--skip", type=int, default=4,
                        help="optimizer steps to leave out first (warm-up); at least 1: the first holds the loading")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps to profile")
    parser.add_argument("--isa", choices=("native", "avx2"), default="native",
                        help="avx2: run as on a CPU without AVX-512 (set before torch loads), as bench_train does")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a finetune train override")
    parser.add_argument("--table", type=int, default=0, metavar="N", help="also PyTorch's table of the top N")
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="torch's intra-op threads (0: its own)")
    parser.add_argument("--peer", action="store_true", help="profile the tuned peer (bench_train.py) instead")
    args = parser.parse_args()
    if args.skip < 1 or args.steps < 1:
        # the profiler's first step runs from its start to the first optimizer step: model and data loading
        parser.error("--skip and --steps must be at least 1")
    if args.isa == "avx2":
        from bench_train import AVX2_ONLY  # scripts/ is on the path when this runs as a script

        os.environ.update(AVX2_ONLY)
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from finetune.cli import main as finetune_main
    from finetune.config import load_config
    from finetune.errors import FinetuneError

    try:
        config = load_config(args.config, overrides=args.set)
    except FinetuneError as err:
        raise SystemExit(f"profile_train: error: {err}") from None
    rank = config.lora.r
    if args.threads:
        torch.set_num_threads(args.threads)
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
        schedule=torch.profiler.schedule(wait=args.skip - 1, warmup=1, active=args.steps,
                                         repeat=1))
    steps = [0]

    def step(*_) -> None:  # the loop's one optimizer step per step is the profiler's clock: no hook in finetune
        steps[0] += 1
        profiler.step()

    hook = register_optimizer_step_post_hook(step)
    with tempfile.TemporaryDirectory(prefix="ft-profile-") as home:
        os.environ["FINETUNE_HOME"] = home
        with profiler:
            code = (_run_peer(config, home) if args.peer else
                    finetune_main(["train", args.config, "--create-destination", "--quiet",
                                   *(arg for item in args.set for arg in ("--set", item))]))
    hook.remove()
    if code:
        return code
    if steps[0] < args.skip + args.steps:
        raise SystemExit(f"profile_train: error: --skip {args.skip} --steps {args.steps} needs "
                         f"{args.skip + args.steps} steps, and {args.config} trained {steps[0]} (raise "
                         "train.max_steps, or --set it)")
    events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CPU]
    time_us, flops = defaultdict(float), defaultdict(float)
    for event in events:
        name, shapes = event.name, event.input_shapes
        kind, work = group(name, shapes, rank)
        time_us[kind] += event.self_cpu_time_total
        flops[kind] += work
    total = sum(time_us.values())
    print(f"\n{args.steps} steps profiled, {total / 1e6:.2f} s of operator time (self), LoRA rank {rank}, "
          f"{torch.get_num_threads()} threads")
    for kind in ("frozen products", "rank-r products", "attention", "everything else"):
        rate = (f"{flops[kind] / 1e9:8.0f} GFLOP at {flops[kind] / time_us[kind] / 1e3:.0f} GFLOP/s"
                if flops[kind] and time_us[kind] else "")
        print(f"  {kind:17} {time_us[kind] / 1e6:7.2f} s {time_us[kind] / total:6.1%}  {rate}")
    if args.table:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.table))
    return 0


def _run_peer(config, work: str) -> int:
    """The tuned peer of bench_train.py on CONFIG's model, data, steps and precision, in this process."""
    from argparse import Namespace

    import bench_train  # scripts/ is on the path when this runs as a script

    if config.lora.r != bench_train.LORA["r"] or config.train.batch_size != bench_train.BATCH:
        raise SystemExit(f"profile_train: error: --peer trains LoRA r {bench_train.LORA['r']} on batches of "
                         f"{bench_train.BATCH}, as bench_train.py does; the config has r {config.lora.r}, batch "
                         f"{config.train.batch_size}")
    bench_train.MAX_LEN = config.data.max_seq_len  # read by its tokenizing when the peer starts: CONFIG's
    data = str(config.data.path)  # bench_train tokenizes a held-out file too: the peer never reads it
    paths = {"model": str(config.base_model), "train": data, "eval": data, "format": config.data.format}
    precision = config.train.precision
    if precision == "auto":  # the rule the benchmark gives both sides: finetune's own choice
        precision = bench_train.capability()["auto"]
    bench_train.peer_main(Namespace(role="peer-tuned", paths=json.dumps(paths), steps=config.train.max_steps,
                                    work=work, budget=0, precision=precision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
