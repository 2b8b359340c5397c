"""Serving predictions: inference workers that keep versions loaded and decode requests in batches.

- :mod:`.schema` — a version's inputs and outputs (its ``openapi_schema``) and the input check (no torch);
- the engine they run is :mod:`finetune.decoding` (loaded versions, the batched decoding loop);
- :mod:`.prompts` — prompts rendered, tokenized and checked against the context before admission;
- :mod:`.worker` — the worker process and the handle the server talks to it through (Ray actors running the
  same worker core: :mod:`finetune.cluster.inference`);
- :mod:`.service` — prediction records, limits, waiting (:mod:`.signals`), streaming, webhooks: what the HTTP
  routes call;
- :mod:`.comparisons` — the web app's comparisons, bounded, run by the workers.

Importing this package imports no torch; only the worker's modules do.
"""
