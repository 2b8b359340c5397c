"""What a version accepts and returns: its OpenAPI schema (Replicate's shape), and the input check against it.

Both come from the input models of :mod:`finetune.serving.inputs`: the server publishes :func:`openapi_schema`
(their JSON schema) as a version's ``openapi_schema`` (server/objects.py), and :func:`check_input` validates a
prediction's input with them, naming every offending field. The output is an iterator of strings, concatenated
for display, as Replicate's language models declare it, so the official clients join or stream the text pieces.

No torch here: the server imports this module on its request path.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from ..errors import InputError, UsageError
from ..generation import DEFAULTS
from ..generation import problems as _problems
from .inputs import ChatInput, conversation_problem, input_model

# What the web app's forms show as defaults (those of finetune.generation, the one definition)
GENERATION_DEFAULTS = {k: getattr(DEFAULTS, k) for k in ("max_new_tokens", "temperature", "top_p")}
DEFAULT_MAX_NEW_TOKENS = DEFAULTS.max_new_tokens
# The prompt's size in UTF-8 bytes (prompt, system prompt and message contents together) unless the server sets
# another (finetune serve --predict-max-prompt-size): a larger one costs seconds of tokenizing and is over any
# context anyway.
DEFAULT_MAX_PROMPT_BYTES = 512 * 1024
_HINT = "see the version's openapi_schema for the accepted inputs"


def _plain(schema: Any) -> Any:
    """A JSON schema with each optional value (``anyOf: [X, null]``) written as X, as Cog declares them."""
    if isinstance(schema, list):
        return [_plain(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _plain(v) for k, v in schema.items()}
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options and len(options) == 2:
        del out["anyOf"]
        out.update(next(o for o in options if o != {"type": "null"}))
        if out.get("default", 0) is None:
            del out["default"]
    return out


def input_schema(chat: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``Input`` schema of a version and the schemas it refers to (``#/components/schemas/NAME``)."""
    schema = _plain(input_model(chat).model_json_schema(ref_template="#/components/schemas/{model}"))
    refs = schema.pop("$defs", {})
    schema.pop("description", None)
    for order, prop in enumerate(schema["properties"].values()):
        prop["x-order"] = order
    schema.setdefault("required", [])
    return schema, refs


def openapi_schema(chat: bool) -> dict[str, Any]:
    """The schema of a language model's predictions, as Cog declares it: ``Input`` lists the inputs;
    ``Output`` is an array of strings with ``x-cog-array-type: iterator``, which the client streams and
    concatenates."""
    from .. import __version__

    inputs, refs = input_schema(chat)
    return {
        "openapi": "3.0.2",
        "info": {"title": "finetune", "version": __version__},
        "paths": {},
        "components": {"schemas": {
            "Input": inputs,
            "Output": {"type": "array", "title": "Output", "items": {"type": "string"},
                       "x-cog-array-type": "iterator", "x-cog-array-display": "concatenate"},
            **refs,
        }},
    }


def prompt_format(metadata: dict[str, Any]) -> str:
    """The prompt format a version (its manifest ``metadata``) was trained with; a base version takes raw text.
    The same rule as :func:`finetune.inference.prompt_format_of`, without importing torch."""
    return (metadata.get("prompt_format") or {}).get("name") or "text"


def prompt_bytes(checked: dict[str, Any]) -> int:
    """The size of a checked input's text in UTF-8 bytes: prompt, system prompt and every message's content."""
    texts = [checked.get("prompt") or "", checked.get("system_prompt") or ""]
    texts += [m["content"] for m in checked.get("messages") or []]
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def check_input(prompt_format: str, data: Any,
                max_prompt_bytes: int | None = DEFAULT_MAX_PROMPT_BYTES) -> dict[str, Any]:
    """The prediction input validated by the version's input model, with defaults filled in.

    Raises :class:`~finetune.errors.InputError` (HTTP 422) naming every field that is unknown, of the wrong type
    or out of range (``fields``: each as ``{field, message}``), or a prompt over ``max_prompt_bytes`` (None: no
    limit); a :class:`UsageError` for input that is not an object. ``stop_sequences`` comes back as a list;
    ``seed`` only when given.
    """
    if not isinstance(data, dict):
        raise UsageError("input must be an object", 'e.g. {"prompt": "Name a color."}')
    model = input_model(prompt_format == "messages")
    try:
        out = model.model_validate(data, context={"prompt_format": prompt_format}).model_dump(exclude_none=True)
    except ValidationError as err:
        problems: dict[str, str] = {}
        for field, text in _problems(model, err):
            problems.setdefault(field, text)  # the first of each field's (a union's members say it each)
        if model is ChatInput:  # the rule on both fields runs once both are valid: say it now too
            either = conversation_problem(data.get("prompt") is not None, data.get("messages") is not None)
            if either is not None and either[0] not in problems:
                problems = {either[0]: either[1], **problems}
        raise InputError(list(problems.items()), _HINT) from None
    if max_prompt_bytes is not None and (size := prompt_bytes(out)) > max_prompt_bytes:
        field = "messages" if "messages" in out else "prompt"
        raise InputError([(field, f"the prompt is {size:,} bytes, over this server's limit of "
                                  f"{max_prompt_bytes:,} bytes")],
                         "shorten it (the server's limit is finetune serve --predict-max-prompt-size)")
    return out
