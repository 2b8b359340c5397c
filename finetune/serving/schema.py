"""What a version accepts and returns: its OpenAPI schema (Replicate's shape), and the input check against it.

One definition serves both sides: the server publishes :func:`openapi_schema` as a version's
``openapi_schema`` (server/objects.py), and :func:`check_input` applies the same schema to a prediction's
input, naming the offending field. The output is an iterator of strings, concatenated for display, as
Replicate's language models declare it, so the official clients join or stream the text pieces.

No torch here: the server imports this module on its request path.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import UsageError

# The defaults of finetune.inference.GenerationSettings (not imported: it imports torch); a test compares them.
GENERATION_DEFAULTS = {"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0}
DEFAULT_MAX_NEW_TOKENS = GENERATION_DEFAULTS["max_new_tokens"]
# The real ranges of the inputs. Outside them sampling breaks for everyone in a batch, not only the caller: a
# temperature of 1e-300 turns logits into inf (a NaN distribution), a seed past 2**63-1 overflows torch's.
MAX_NEW_TOKENS = 1 << 20  # generation also stops at the model's context, whatever this says
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_TOP_K = 1 << 20  # past any vocabulary
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_MESSAGES = 1024
# The prompt's size in UTF-8 bytes (prompt, system prompt and message contents together) unless the server sets
# another (finetune serve --predict-max-prompt-size): a larger one costs seconds of tokenizing and is over any
# context anyway.
DEFAULT_MAX_PROMPT_BYTES = 512 * 1024

# name -> JSON schema of the property; "x-order" keeps the display order Replicate's pages use.
_COMMON: dict[str, dict[str, Any]] = {
    "max_new_tokens": {"type": "integer", "title": "Max New Tokens", "minimum": 1, "maximum": MAX_NEW_TOKENS,
                       "default": GENERATION_DEFAULTS["max_new_tokens"],
                       "description": "The most tokens to generate (capped by the model's context)."},
    "temperature": {"type": "number", "title": "Temperature", "minimum": 0, "maximum": MAX_TEMPERATURE,
                    "default": GENERATION_DEFAULTS["temperature"],
                    "description": f"0 is greedy decoding; from {MIN_TEMPERATURE} up, higher samples more freely."},
    "top_p": {"type": "number", "title": "Top P", "exclusiveMinimum": 0, "maximum": 1,
              "default": GENERATION_DEFAULTS["top_p"],
              "description": "Sample from the smallest set of tokens whose probabilities add up to top_p."},
    "top_k": {"type": "integer", "title": "Top K", "minimum": 0, "maximum": MAX_TOP_K, "default": 0,
              "description": "Sample from the k most likely tokens only (0: no limit)."},
    "seed": {"type": "integer", "title": "Seed", "minimum": 0, "maximum": MAX_SEED,
             "description": "Makes sampling repeatable."},
    "stop_sequences": {"type": "string", "title": "Stop Sequences",
                       "description": f"Comma-separated texts that end the output when generated (not included); "
                                      f"a JSON list of strings is accepted too. At most {MAX_STOP_SEQUENCES}, each "
                                      f"at most {MAX_STOP_SEQUENCE_CHARS} characters."},
}


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
    props.update({name: dict(prop) for name, prop in _COMMON.items()})
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


def _bad(field: str, problem: str) -> UsageError:
    return UsageError(f"input.{field}: {problem}", "see the version's openapi_schema for the accepted inputs")


def _number(field: str, value: Any, integer: bool, low: float, high: float, what: str = "") -> Any:
    """``value`` if it is a finite number (an integer when ``integer``) within ``low..high``; else a 422."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise _bad(field, f"must be {'an integer' if integer else 'a number'}, got {_short(value)}")
    if not low <= value <= high:  # compared as given: an int too large for a float is out of range, not an error
        raise _bad(field, f"must be {what or f'between {low} and {high}'}, got {_short(value)}")
    return value if integer else float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _stop_sequences(value: Any) -> list[str]:
    if isinstance(value, str):
        if len(value) > MAX_STOP_SEQUENCES * (MAX_STOP_SEQUENCE_CHARS + 1):
            raise _bad("stop_sequences", f"is {len(value)} characters: at most {MAX_STOP_SEQUENCES} sequences of "
                                         f"at most {MAX_STOP_SEQUENCE_CHARS} characters")
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad("stop_sequences", "must be a comma-separated string or a list of strings")
    stops = [s for s in value if s]
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _bad("stop_sequences", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    long = next((s for s in stops if len(s) > MAX_STOP_SEQUENCE_CHARS), None)
    if long is not None:
        raise _bad("stop_sequences", f"each at most {MAX_STOP_SEQUENCE_CHARS} characters, got one of {len(long)}")
    return stops


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

    out["max_new_tokens"] = _number("max_new_tokens", data.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS), True,
                                    1, MAX_NEW_TOKENS)
    out["temperature"] = _number("temperature", data.get("temperature", 0.0), False, 0, MAX_TEMPERATURE,
                                 f"0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")
    if 0 < out["temperature"] < MIN_TEMPERATURE:
        raise _bad("temperature", f"must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}, got "
                                  f"{_short(data['temperature'])}")
    out["top_p"] = _number("top_p", data.get("top_p", 1.0), False, 0, 1, "in (0, 1]")
    if out["top_p"] <= 0:
        raise _bad("top_p", f"must be in (0, 1], got {_short(data['top_p'])}")
    out["top_k"] = _number("top_k", data.get("top_k", 0), True, 0, MAX_TOP_K, f"0 (no limit) up to {MAX_TOP_K}")
    if data.get("seed") is not None:
        out["seed"] = _number("seed", data["seed"], True, 0, MAX_SEED, f"between 0 and {MAX_SEED} (2**63-1)")
    out["stop_sequences"] = _stop_sequences(data.get("stop_sequences", ""))
    return out
