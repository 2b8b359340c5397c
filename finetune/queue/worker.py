"""A queue worker process: ``python -m finetune.queue.worker --registry ROOT``.

It runs under a :class:`~finetune.supervisor.Child` of the executor. It imports the training stack first (torch,
transformers: seconds), reports ``ready``, then waits for one message ``{"op": "run", "training_id": ID}`` and
runs it with :func:`~finetune.training.run.run_training`, exactly as ``finetune train --resume ID`` would. The
queue starts a worker ahead of need, so a training it picks up starts loading its model at once instead of
waiting for the imports. One training per process: its memory (and GPU memory) goes back to the system when it
exits. End of input without an id means "not needed": exit 0.

While it runs, the training reports what changes (``status``, each step's ``metrics``, ``log`` lines) through
:func:`finetune.supervisor.notify`; the record, ``metrics.jsonl`` and the log on disk stay the truth.

Exit codes: 0 the training succeeded (or there was nothing to run), 1 it failed or was canceled (the record says
which and why), 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.queue.worker")
    parser.add_argument("--registry", required=True, metavar="PATH")
    args = parser.parse_args(argv)

    from ..errors import FinetuneError
    from ..registry import Registry
    from ..supervisor import Channel
    from ..training.run import run_training  # the slow imports, done before anyone waits

    channel = Channel.open()
    channel.send("ready", pid=os.getpid())
    message = next(channel.messages(), None)
    training_id = str(message.get("training_id") or "") if message and message.get("op") == "run" else ""
    if not training_id:
        return 0
    try:
        run_training(training_id, registry=Registry(args.registry), progress=False)
    except FinetuneError as err:  # the record holds the reason; this line is for the server's console
        print(f"finetune worker: training {training_id}: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The record and the version are on disk: skip the interpreter's teardown of torch and friends (seconds),
    # which would hold the worker's slot for nothing.
    os._exit(code)
