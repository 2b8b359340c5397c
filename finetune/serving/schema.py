"""What a version accepts and returns: its OpenAPI schema (Replicate's shape), and the input check against it.

Both come from the input models of :mod:`finetune.serving.inputs`: the server publishes :func:`openapi_schema`
(their JSON schema) as a version's ``openapi_schema`` (server/objects.py), and :func:`check_input` validates a
prediction's input with them, naming every offending field. The output is an iterator of strings, concatenated
for display, as Replicate's language models declare it, so the official clients join or stream the text pieces.

No torch here: the server imports this module on its request path.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import InputError, UsageError
from .inputs import MAX_MESSAGES, ChatInput, accepted_values, conversation_problem, defaults, input_model

# The defaults of finetune.inference.GenerationSettings (not imported: it imports torch); a test compares them.
GENERATION_DEFAULTS = {k: v for k, v in defaults().items() if k in ("max_new_tokens", "temperature", "top_p")}
DEFAULT_MAX_NEW_TOKENS = GENERATION_DEFAULTS["max_new_tokens"]
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


def input_properties(chat: bool) -> dict[str, dict[str, Any]]:
    """The inputs of a version (its input model's JSON schema properties, ``x-order`` numbered in declaration
    order); ``chat``: trained on messages (it also takes ``messages`` and ``system_prompt``)."""
    return input_schema(chat)[0]["properties"]


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _range(model: type[BaseModel], name: str) -> str:
    """A field's accepted values in words: its :class:`~finetune.serving.inputs.Accepts`, else its bounds."""
    words = accepted_values(model, name)
    if words:
        return words
    bounds: dict[str, Any] = {}
    for meta in model.model_fields[name].metadata:
        bounds.update({k: getattr(meta, k) for k in ("gt", "ge", "lt", "le") if getattr(meta, k, None) is not None})
    low = f"({bounds['gt']}" if "gt" in bounds else f"[{bounds.get('ge')}"
    high = f"{bounds['lt']})" if "lt" in bounds else f"{bounds.get('le')}]"
    if low.startswith("[") and high.endswith("]"):
        return f"between {low[1:]} and {high[:-1]}"
    return f"in {low}, {high}"


def _problem(model: type[BaseModel], error: Any) -> tuple[str, str]:
    """One validation error as (field, message) in this module's words."""
    loc, kind, value = error["loc"], error["type"], error.get("input")
    field = (error.get("ctx") or {}).get("field") or (str(loc[0]) if loc else "input")
    if kind.startswith("input_") and kind != "input_range":  # the models' own words
        return field, error["msg"]
    if field == "messages" and len(loc) > 1:
        return f"messages[{loc[1]}]", "must be an object with string role and content"
    if kind == "extra_forbidden":
        return field, f"unknown input (this version accepts: {', '.join(model.model_fields)})"
    if kind == "missing":
        return field, "is required (give prompt)"
    if field == "messages" and kind == "too_long":
        return field, f"at most {MAX_MESSAGES} messages, got {len(value)}"
    if field == "messages":
        return field, "must be a non-empty list of {role, content} objects"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith(("greater_than", "less_than", "input_range")) or (kind == "float_type" and numeric):
        return field, f"must be {_range(model, field)}, got {_short(value)}"  # an int too large for a float too
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return field, f"must be an integer, got {_short(value)}"
    if kind in ("float_type", "finite_number", "float_parsing"):
        return field, f"must be a number, got {_short(value)}"
    if kind == "string_type":
        return field, f"must be a string, got {type(value).__name__}"
    return field, error["msg"][:1].lower() + error["msg"][1:]


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
        for field, text in (_problem(model, e) for e in err.errors()):
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
