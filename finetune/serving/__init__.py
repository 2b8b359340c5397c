"""Serving predictions: inference workers that keep versions loaded and decode requests in batches.

- :mod:`.schema` — a version's inputs and outputs (its ``openapi_schema``) and the input check (no torch);
- :mod:`.text` — streamed text pieces from token ids, stop sequences;
- :mod:`.cache` — loaded versions: one base model per base, adapters beside it, LRU within a memory budget;
- :mod:`.engine` — the batched decoding loop (KV cache, joining, cancel, accounts taking turns), over
  :mod:`.batch` (the batch's tensors);
- :mod:`.prompts` — prompts rendered, tokenized and checked against the context before admission;
- :mod:`.worker` — the worker process and the handle the server talks to it through (Ray actors running the
  same worker core: :mod:`finetune.cluster.inference`);
- :mod:`.service` — prediction records, limits, waiting (:mod:`.signals`), streaming, webhooks: what the HTTP
  routes call;
- :mod:`.comparisons` — the web app's comparisons, bounded, run by the workers.

Importing this package imports no torch; only the worker's modules do.
"""
