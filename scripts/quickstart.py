#!/usr/bin/env python
"""The quickstart, fully offline: a tiny base model, one destination, two trainings, an answer.

    python scripts/quickstart.py [--registry PATH]

1. builds a tiny Llama (random init; a BPE tokenizer trained here on the shipped sample data), saved as an
   ordinary Hugging Face folder, and imports it into the registry as ``local/tiny`` (once);
2. creates the destination ``quickstart/assistant``;
3. trains configs/quickstart.yaml into it (a new version), then continues training from that version
   (another version of the same destination, whose parent is the first);
4. loads the newest version and answers the sample prompts; the last line says how many it answers exactly.

Run it again and it reuses the base and adds two more versions. The registry is $FINETUNE_HOME, else
./registry.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the quickstart comes from a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
BASE, DESTINATION = "local/tiny", "quickstart/assistant"
TINY = dict(hidden_size=256, num_layers=4, num_heads=4)  # learns the sample answers in ~100 LoRA steps


def main() -> int:
    parser = argparse.ArgumentParser(description="finetune quickstart (offline)")
    parser.add_argument("--registry", default=None, help="registry root (default: $FINETUNE_HOME, else ./registry)")
    args = parser.parse_args()

    from finetune import Registry
    from finetune.config import load_config
    from finetune.errors import FinetuneError
    from finetune.inference import GenerationSettings, generate, load_version, prompt_from_record
    from finetune.registry.sources import import_base
    from finetune.tiny import build_tiny_model, load_sample_records
    from finetune.training import train

    reg = Registry(args.registry)
    print(f"registry: {reg.root}")
    try:
        # 1. the base model
        if not reg.list_models() or BASE not in {m.full_name for m in reg.list_models()}:
            with tempfile.TemporaryDirectory() as tmp:
                folder = build_tiny_model(Path(tmp) / "tiny", **TINY)
                base = import_base(reg, BASE, str(folder), description="tiny random-init Llama for the quickstart")
            print(f"$ finetune models import {BASE} --from <tiny model folder>   -> {base.ref}")
        else:
            print(f"base model {BASE} already imported: {reg.resolve(BASE).ref}")

        # 2. the destination
        reg.create_model(DESTINATION, description="quickstart fine-tunes", exist_ok=True)
        print(f"$ finetune models create {DESTINATION}")

        # 3. two trainings into the same destination; the second continues from the first
        config = load_config(REPO / "configs" / "quickstart.yaml", [f"base_model={reg.resolve(BASE).ref}"])
        print("$ finetune train configs/quickstart.yaml")
        start = time.perf_counter()
        first = train(config, registry=reg, destination=DESTINATION).version
        print(f"-> {first.ref}  (train loss {first.metadata['metrics']['train_loss']:.4f}, "
              f"{time.perf_counter() - start:.0f} s)")
        config = load_config(REPO / "configs" / "quickstart.yaml",
                             [f"base_model={first.ref}", "train.max_steps=30", "train.lr=5e-4", "train.warmup_steps=0"])
        print(f"$ finetune train configs/quickstart.yaml --set base_model={first.ref} --set train.max_steps=30 "
              "--set train.lr=5e-4")
        start = time.perf_counter()
        second = train(config, registry=reg, destination=DESTINATION).version
        print(f"-> {second.ref}  (parent {second.parent['ref']}, train loss "
              f"{second.metadata['metrics']['train_loss']:.4f}, {time.perf_counter() - start:.0f} s)")

        # 4. answers from the newest version
        loaded = load_version(reg, second.ref)
        records = load_sample_records()
        settings = GenerationSettings(max_new_tokens=32)
        answers = [generate(loaded, prompt_from_record("alpaca", r, "sample"), settings) for r in records]
    except FinetuneError as err:
        print(f"quickstart: error: {err}", file=sys.stderr)
        return err.exit_code
    sample = records[0]
    print(f'\n$ finetune predict {second.ref} "{sample["instruction"]}"\n{answers[0]}')
    exact = sum(a.strip() == r["output"].strip() for a, r in zip(answers, records))
    print(f"\n{second.ref} answers {exact} of {len(records)} sample prompts exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
