"""A model's context length: the most positions (prompt and output together) it was built for.

One rule for training (``data.max_seq_len`` may not exceed it) and for generation (a prompt may not fill it,
an answer stops at its end): the first positive count among the config's own names for it, then the
tokenizer's ``model_max_length`` where that is a real limit (tokenizers without one say 1e30); else unknown.
"""

from __future__ import annotations

from typing import Any

# The names model configs give their number of positions, most common first (Llama/Mistral/Qwen/...: the first;
# GPT-2: n_positions; MPT and some remote-code models: max_sequence_length / seq_length).
CONFIG_NAMES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_NO_LIMIT = 10**7  # past any real context: transformers' "unset" model_max_length is 1e30


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """The context length of a model with ``config`` (a transformers config; None: unreadable) and, optionally,
    ``tokenizer``; None where neither says."""
    text_config = getattr(config, "get_text_config", None)  # a multimodal model: its language model's config
    if callable(text_config):
        config = text_config()
    for name in CONFIG_NAMES:
        found = _count(getattr(config, name, None))
        if found is not None:
            return found
    limit = _count(getattr(tokenizer, "model_max_length", None))
    return limit if limit is not None and limit < _NO_LIMIT else None
