"""Prompts for the inference workers: rendered and tokenized exactly as each version was trained, and checked
against the model's context and the server's token limit, before a prediction is admitted.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import InputError, UsageError


class Prompts:
    """Renders and tokenizes prompts per version with the version's own tokenizer settings; checks the context.

    It holds its own tokenizers (not the engine's), so admitting a request never waits for a running batch.
    """

    def __init__(self, registry: Any, max_tokens: int | None = None):
        self.registry = registry
        self.max_tokens = max_tokens
        self._versions: dict[str, tuple[Any, int, str]] = {}  # version id -> (LoadedVersion, context, base key)
        self._lock = threading.Lock()  # prompts are prepared on several threads; a tokenizer loads once

    def _entry(self, ref: str) -> tuple[Any, int, str]:
        version = self.registry.resolve(ref)
        with self._lock:
            return self._versions.get(version.id) or self._load(version)

    def _load(self, version: Any) -> tuple[Any, int, str]:
        from ..inference import LoadedVersion, prompt_format_of, resolve_device
        from ..modeling.load import load_tokenizer
        from ..registry.sources import resolve_model
        from .cache import base_key

        resolved = resolve_model(self.registry, version.ref)
        tokenizer = load_tokenizer(resolved.base)
        trained_template = (version.metadata.get("prompt_format") or {}).get("chat_template")
        if trained_template:
            tokenizer.chat_template = trained_template
        context = _context_length(resolved.base, tokenizer)
        loaded = LoadedVersion(version, resolved, None, tokenizer, prompt_format_of(version), resolve_device("cpu"),
                               "fp32")
        entry = (loaded, context, base_key(resolved))
        self._versions[version.id] = entry
        return entry

    def prepare(self, job_id: str, ref: str, data: dict[str, Any], emit: Any, owner: str = "") -> Any:
        """A :class:`~finetune.serving.engine.Job` for a checked input, or a FinetuneError saying what is wrong."""
        from ..inference import Prompt, prompt_ids
        from .engine import Job
        from .schema import check_input

        loaded, context, key = self._entry(ref)
        data = check_input(loaded.prompt_format, data, max_prompt_bytes=None)  # the server checked the size
        prompt = Prompt(data["messages"]) if "messages" in data else Prompt(data["prompt"])
        ids = prompt_ids(loaded, prompt, system=data.get("system_prompt"))
        if len(ids) >= context:
            raise UsageError(f"the prompt is {len(ids)} tokens, but the context of {loaded.version.ref} is {context} "
                             "tokens (prompt and output together)", "shorten the prompt")
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise InputError([("prompt", f"the prompt is {len(ids):,} tokens, over this server's limit of "
                                         f"{self.max_tokens:,}")],
                             "shorten it (the server's limit is finetune serve --predict-max-prompt-tokens)")
        return Job(job_id, loaded.version.ref, key, ids, min(data["max_new_tokens"], context - len(ids)), emit,
                   temperature=data["temperature"], top_p=data["top_p"], top_k=data["top_k"], seed=data.get("seed"),
                   stop_sequences=data["stop_sequences"], owner=owner)


def _context_length(base: Any, tokenizer: Any) -> int:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base.load_path, revision=base.revision)
    except (OSError, ValueError):
        config = None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048
