"""Decoding: the engine that generates text from loaded versions, for every caller alike.

- :mod:`.text` — streamed text pieces from token ids, stop sequences;
- :mod:`.lora` — adapters served beside their base (installed, routed per row, merged in place);
- :mod:`.cache` — loaded versions: one base model per base, adapters beside it, LRU within a memory budget;
- :mod:`.batch` — a batch's tensors (KV cache, positions, attention masks);
- :mod:`.job` — a prediction as the engine runs it, its events and final metrics;
- :mod:`.sampling` — the next token drawn as the generation settings say (temperature, top-k, top-p);
- :mod:`.engine` — the batched decoding loop (joining, cancel, accounts taking turns);
- :mod:`.local` — the engine run in this process over one loaded version (CLI, Python, comparisons).

The inference workers of :mod:`finetune.serving` run the same engine for the HTTP APIs.
"""
