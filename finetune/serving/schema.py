"""What a version accepts and returns: its OpenAPI schema (Replicate's shape), and the input check against it.

One definition serves both sides: the server publishes :func:`openapi_schema` as a version's
``openapi_schema`` (server/objects.py), and :func:`check_input` applies the same schema to a prediction's
input, naming the offending field. The output is an iterator of strings, concatenated for display, as
Replicate's language models declare it, so the official clients join or stream the text pieces.

No torch here: the server imports this module on its request path.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..generation import DEFAULTS, OPTIONS, check_settings, json_properties

# The generation options are defined once (finetune.generation): their defaults, ranges and check are the API's.
GENERATION_DEFAULTS = {k: getattr(DEFAULTS, k) for k in ("max_new_tokens", "temperature", "top_p")}
DEFAULT_MAX_NEW_TOKENS = DEFAULTS.max_new_tokens
MAX_MESSAGES = 1024
# The prompt's size in UTF-8 bytes (prompt, system prompt and message contents together) unless the server sets
# another (finetune serve --predict-max-prompt-size): a larger one costs seconds of tokenizing and is over any
# context anyway.
DEFAULT_MAX_PROMPT_BYTES = 512 * 1024

def input_properties(chat: bool) -> dict[str, dict[str, Any]]:
    """The inputs of a version; ``chat``: trained on messages (it also takes ``messages`` and ``system_prompt``)."""
    props: dict[str, dict[str, Any]] = {
        "prompt": {"type": "string", "title": "Prompt",
                   "description": "The text to continue (or the user turn), formatted as the version was trained."},
    }
    if chat:
        props["system_prompt"] = {"type": "string", "title": "System Prompt",
                                  "description": "A system message placed before the prompt."}
        props["messages"] = {
            "type": "array", "title": "Messages",
            "description": "A whole conversation, [{role, content}, ...], instead of prompt.",
            "items": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
                      "required": ["role", "content"]},
        }
    props.update(json_properties())
    for order, prop in enumerate(props.values()):
        prop["x-order"] = order
    return props


def openapi_schema(chat: bool) -> dict[str, Any]:
    """The schema of a language model's predictions, as Cog declares it: ``Input`` lists the inputs;
    ``Output`` is an array of strings with ``x-cog-array-type: iterator``, which the client streams and
    concatenates."""
    from .. import __version__

    return {
        "openapi": "3.0.2",
        "info": {"title": "finetune", "version": __version__},
        "paths": {},
        "components": {"schemas": {
            "Input": {"type": "object", "title": "Input", "properties": input_properties(chat),
                      "required": [] if chat else ["prompt"]},
            "Output": {"type": "array", "title": "Output", "items": {"type": "string"},
                       "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"},
        }},
    }


def prompt_format(metadata: dict[str, Any]) -> str:
    """The prompt format a version (its manifest ``metadata``) was trained with; a base version takes raw text.
    The same rule as :func:`finetune.inference.prompt_format_of`, without importing torch."""
    return (metadata.get("prompt_format") or {}).get("name") or "text"


_HINT = "see the version's openapi_schema for the accepted inputs"


def _bad(field: str, problem: str) -> UsageError:
    return UsageError(f"input.{field}: {problem}", _HINT)


def prompt_bytes(checked: dict[str, Any]) -> int:
    """The size of a checked input's text in UTF-8 bytes: prompt, system prompt and every message's content."""
    texts = [checked.get("prompt") or "", checked.get("system_prompt") or ""]
    texts += [m["content"] for m in checked.get("messages") or []]
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def check_input(prompt_format: str, data: Any,
                max_prompt_bytes: int | None = DEFAULT_MAX_PROMPT_BYTES) -> dict[str, Any]:
    """The prediction input checked against the version's schema, with defaults filled in.

    Raises :class:`UsageError` (HTTP 422) naming the first field that is unknown, of the wrong type or out of
    range, or a prompt over ``max_prompt_bytes`` (None: no limit). ``stop_sequences`` comes back as a list.
    """
    if not isinstance(data, dict):
        raise UsageError("input must be an object", 'e.g. {"prompt": "Name a color."}')
    props = input_properties(prompt_format == "messages")
    unknown = sorted(set(data) - set(props))
    if unknown:
        raise _bad(unknown[0], f"unknown input (this version accepts: {', '.join(props)})")
    out: dict[str, Any] = {}
    for name in ("prompt", "system_prompt"):
        if name in data and data[name] is not None:
            if not isinstance(data[name], str):
                raise _bad(name, f"must be a string, got {type(data[name]).__name__}")
            out[name] = data[name]
    if data.get("messages") is not None:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "must be a non-empty list of {role, content} objects")
        if len(messages) > MAX_MESSAGES:
            raise _bad("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _bad(f"messages[{k}]", "must be an object with string role and content")
        out["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in out and "messages" in out:
        raise _bad("messages", "give either prompt or messages, not both")
    if "prompt" not in out and "messages" not in out:
        need = "prompt or messages" if prompt_format == "messages" else "prompt"
        raise _bad("prompt", f"is required (give {need})")
    if "prompt" in out and not out["prompt"].strip() and prompt_format != "text":
        raise _bad("prompt", "is empty")

    if max_prompt_bytes is not None and (size := prompt_bytes(out)) > max_prompt_bytes:
        field = "messages" if "messages" in out else "prompt"
        raise UsageError(f"input.{field}: the prompt is {size:,} bytes, over this server's limit of "
                         f"{max_prompt_bytes:,} bytes", "shorten it (the server's limit is finetune serve "
                                                        "--predict-max-prompt-size)")

    options = {name: data[name] for name in OPTIONS if name in data}
    out.update(check_settings(options, name=lambda field: f"input.{field}", hint=_HINT).to_input())
    return out
