"""Run ``finetune train`` in several processes on one machine, through accelerate's launcher.

    python -m finetune.launch --num-processes 2 [--cpu] [--registry PATH] -- CONFIG.yaml --destination OWNER/NAME
    python -m finetune.launch --num-processes 4 -- --resume TRAINING_ID

(``python scripts/launch.py`` in a source checkout runs the same.) The training queue starts a slot of several
GPUs with this module (:mod:`finetune.queue.executor`), so it works from an installed package too.

Everything after ``--`` goes to ``finetune train``. Only the main process writes the training record, the
metrics and the version, so a launch publishes one version whatever the process count.

Why not ``accelerate launch --cpu --num_processes 2 -m finetune train ...``: with ``--cpu`` accelerate uses its
single-process launcher (several CPU processes need ``mpirun``), so that command trains in ONE process. This
script always uses accelerate's torchrun launcher (``--multi_gpu``, a misnomer: it starts N local processes on
any device; our training picks the gloo backend when no GPU is visible, and ``--cpu`` hides the GPUs). It also
picks a free rendezvous port, so two launches on one machine do not both take 29500, and gives each process
its share of the cores (``OMP_NUM_THREADS``) unless that is set already.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence


def free_port() -> int:
    """A TCP port nothing listens on right now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_processes() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:
        return 1


def build_command(args: argparse.Namespace, train_args: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The accelerate command line and environment for ``args``; ``train_args`` go to ``finetune train``."""
    n = args.num_processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
           # Our trainer chooses its precision from the config (train.precision); accelerate's flag would not.
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if n > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(args.port or free_port())]
    cmd += ["-m", "finetune"]
    if args.registry:
        cmd += ["--registry", args.registry]
    cmd += ["train", *train_args]

    env = dict(os.environ)
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer then runs on the CPU with gloo
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    return cmd, env


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        ours, train_args = argv[:split], argv[split + 1:]
    else:
        ours, train_args = argv, []
    parser = argparse.ArgumentParser(
        prog="python -m finetune.launch",
        description="Run `finetune train` in several processes (accelerate + torchrun).",
        epilog="Arguments after -- are passed to `finetune train`, e.g. -- CONFIG.yaml --destination OWNER/NAME")
    parser.add_argument("--num-processes", "-n", type=int, default=None,
                        help="processes to start (default: one per visible GPU, else 1)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if GPUs are present")
    parser.add_argument("--port", type=int, default=None, help="rendezvous port (default: a free one)")
    parser.add_argument("--registry", metavar="PATH", default=None,
                        help="registry root (default: $FINETUNE_HOME, else ./registry)")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args = parser.parse_args(ours)
    if args.num_processes is None:
        args.num_processes = 1 if args.cpu else default_processes()
    if args.num_processes < 1:
        parser.error(f"--num-processes must be 1 or more, not {args.num_processes}")
    if not train_args:
        parser.error("nothing to train: add -- CONFIG.yaml --destination OWNER/NAME (or -- --resume ID)")
    return args, train_args


def main(argv: Sequence[str] | None = None) -> int:
    args, train_args = parse(sys.argv[1:] if argv is None else argv)
    cmd, env = build_command(args, train_args)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):  # torchrun passes it on to every process, which then stop as `canceled`
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
