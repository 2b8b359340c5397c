"""Prompts for the inference workers: rendered and tokenized exactly as each version was trained, and checked
against the model's context and the server's token limit, before a prediction is admitted.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import InputError


class Prompts:
    """Renders and tokenizes prompts per version with the version's own tokenizer settings; checks the context.

    It holds its own tokenizers (not the engine's), so admitting a request never waits for a running batch.
    """

    def __init__(self, registry: Any, max_tokens: int | None = None):
        self.registry = registry
        self.max_tokens = max_tokens
        self._versions: dict[str, tuple[Any, int | None, str]] = {}  # version id -> (LoadedVersion, context, base)
        self._lock = threading.Lock()  # prompts are prepared on several threads; a tokenizer loads once

    def _entry(self, ref: str) -> tuple[Any, int | None, str]:
        version = self.registry.resolve(ref)
        with self._lock:
            return self._versions.get(version.id) or self._load(version)

    def _load(self, version: Any) -> tuple[Any, int | None, str]:
        from ..decoding.cache import base_key
        from ..loading import LoadedVersion, prompt_format_of, resolve_device
        from ..modeling.load import base_context, load_tokenizer
        from ..registry.sources import resolve_model

        resolved = resolve_model(self.registry, version.ref)
        tokenizer = load_tokenizer(resolved.base)
        trained_template = (version.metadata.get("prompt_format") or {}).get("chat_template")
        if trained_template:
            tokenizer.chat_template = trained_template
        context = base_context(resolved.base, tokenizer)
        loaded = LoadedVersion(version, resolved, None, tokenizer, prompt_format_of(version), resolve_device("cpu"),
                               "fp32")
        entry = (loaded, context, base_key(resolved))
        self._versions[version.id] = entry
        return entry

    def prepare(self, job_id: str, ref: str, data: dict[str, Any], emit: Any, owner: str = "") -> Any:
        """A :class:`~finetune.decoding.engine.Job` for a checked input, or a FinetuneError saying what is wrong."""
        from ..decoding.engine import Job
        from ..generation import bounded_new_tokens, settings_of
        from ..loading import Prompt, prompt_ids
        from .schema import check_input

        loaded, context, key = self._entry(ref)
        data = check_input(loaded.prompt_format, data, max_prompt_bytes=None)  # the server checked the size
        prompt = Prompt(data["messages"]) if "messages" in data else Prompt(data["prompt"],
                                                                            rendered=bool(data.get("raw_prompt")))
        ids = prompt_ids(loaded, prompt, system=data.get("system_prompt"))
        settings = settings_of(data)  # check_input checked them
        max_new, note = bounded_new_tokens(loaded.version.ref, context, len(ids), settings.max_new_tokens)
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise InputError([("prompt", f"the prompt is {len(ids):,} tokens, over this server's limit of "
                                         f"{self.max_tokens:,}")],
                             "shorten it (the server's limit is finetune serve --predict-max-prompt-tokens)")
        return Job(job_id, loaded.version.ref, key, ids, max_new, emit, settings=settings, owner=owner,
                   notes=[note] if note else [])
