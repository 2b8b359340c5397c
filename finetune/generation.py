"""How to generate: the one definition of the generation options, their defaults, ranges and check.

Every way of running a model takes these options and generates through one engine
(:mod:`finetune.serving.engine`): ``finetune predict``/``chat`` derive their flags from :data:`OPTIONS`, the
HTTP API its input schema (:mod:`finetune.serving.schema`), the Python API takes :class:`GenerationSettings`.
:func:`check_settings` checks them all, naming a bad option the way its caller spells it (``--top-p``,
``input.top_p``). The ranges are the real ones: outside them sampling breaks for everyone in a batch, not only
the caller (a temperature of 1e-300 turns logits into inf, a seed past 2**63-1 overflows torch's).

No torch here: the server imports this module on its request path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import UsageError

MAX_NEW_TOKENS = 1 << 20  # generation also stops at the model's context, whatever this says
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_TOP_K = 1 << 20  # past any vocabulary
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate. ``temperature`` 0 is greedy decoding; ``seed`` makes sampling repeatable; generation
    ends at eos, at a stop sequence (not included in the text) or after ``max_new_tokens``."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()

    def check(self) -> GenerationSettings:
        """These settings checked (:func:`check_settings`); raises :class:`UsageError` naming a bad one."""
        return check_settings(asdict(self))

    def to_input(self) -> dict[str, Any]:
        """As a prediction's input (JSON): ``seed`` only when set, ``stop_sequences`` as a list."""
        out = {**asdict(self), "stop_sequences": list(self.stop_sequences)}
        if self.seed is None:
            del out["seed"]
        return out


@dataclass(frozen=True)
class Option:
    """One generation option: how the API's schema and the CLI's flag describe it."""

    name: str
    kind: type  # int, float or str
    title: str
    description: str
    schema: Mapping[str, Any]  # its JSON-schema range keys


OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("max_new_tokens", int, "Max New Tokens", "The most tokens to generate (capped by the model's context).",
           {"minimum": 1, "maximum": MAX_NEW_TOKENS}),
    Option("temperature", float, "Temperature",
           f"0 is greedy decoding; from {MIN_TEMPERATURE} up, higher samples more freely.",
           {"minimum": 0, "maximum": MAX_TEMPERATURE}),
    Option("top_p", float, "Top P", "Sample from the smallest set of tokens whose probabilities add up to top_p.",
           {"exclusiveMinimum": 0, "maximum": 1}),
    Option("top_k", int, "Top K", "Sample from the k most likely tokens only (0: no limit).",
           {"minimum": 0, "maximum": MAX_TOP_K}),
    Option("seed", int, "Seed", "Makes sampling repeatable.", {"minimum": 0, "maximum": MAX_SEED}),
    Option("stop_sequences", str, "Stop Sequences",
           f"Comma-separated texts that end the output when generated (not included); a JSON list of strings is "
           f"accepted too. At most {MAX_STOP_SEQUENCES}, each at most {MAX_STOP_SEQUENCE_CHARS} characters.", {}),
)}
DEFAULTS = GenerationSettings()


def json_properties() -> dict[str, dict[str, Any]]:
    """The options as JSON-schema properties of a prediction's input (Replicate's shape)."""
    props: dict[str, dict[str, Any]] = {}
    for option in OPTIONS.values():
        kind = {int: "integer", float: "number", str: "string"}[option.kind]
        prop: dict[str, Any] = {"type": kind, "title": option.title, **option.schema}
        default = getattr(DEFAULTS, option.name)
        if default is not None and option.kind is not str:
            prop["default"] = default
        prop["description"] = option.description
        props[option.name] = prop
    return props


def flag(field: str) -> str:
    """The CLI flag of an option: ``--top-p``."""
    return "--" + field.replace("_", "-")


def _same(field: str) -> str:
    return field


def check_settings(values: Mapping[str, Any], name: Callable[[str], str] = _same,
                   hint: str | None = None) -> GenerationSettings:
    """Settings from raw option values (absent or None: the default), each checked against its range.

    Raises :class:`UsageError` for the first bad one, naming it as ``name(option)`` (e.g. ``input.top_p`` or
    ``--top-p``), with ``hint``. ``stop_sequences`` is a comma-separated string or a list of strings.
    """
    def bad(field: str, problem: str) -> UsageError:
        return UsageError(f"{name(field)}: {problem}", hint)

    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise bad(unknown[0], f"unknown generation option (known: {', '.join(OPTIONS)})")
    given = {k: v for k, v in values.items() if v is not None}

    def number(field: str, integer: bool, low: float, high: float, what: str = "") -> Any:
        value = given.get(field, getattr(DEFAULTS, field))
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise bad(field, f"must be {'an integer' if integer else 'a number'}, got {_short(value)}")
        if not low <= value <= high:  # compared as given: an int too large for a float is out of range
            raise bad(field, f"must be {what or f'between {low} and {high}'}, got {_short(value)}")
        return value if integer else float(value)

    temperature_range = f"0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}"
    temperature = number("temperature", False, 0, MAX_TEMPERATURE, temperature_range)
    if 0 < temperature < MIN_TEMPERATURE:
        raise bad("temperature", f"must be {temperature_range}, got {_short(given['temperature'])}")
    top_p = number("top_p", False, 0, 1, "in (0, 1]")
    if top_p <= 0:
        raise bad("top_p", f"must be in (0, 1], got {_short(given['top_p'])}")
    return GenerationSettings(
        max_new_tokens=number("max_new_tokens", True, 1, MAX_NEW_TOKENS),
        temperature=temperature,
        top_p=top_p,
        top_k=number("top_k", True, 0, MAX_TOP_K, f"0 (no limit) up to {MAX_TOP_K}"),
        seed=number("seed", True, 0, MAX_SEED, f"between 0 and {MAX_SEED} (2**63-1)") if "seed" in given else None,
        stop_sequences=_stop_sequences(given.get("stop_sequences", ()), lambda problem: bad("stop_sequences", problem)),
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _stop_sequences(value: Any, bad: Callable[[str], UsageError]) -> tuple[str, ...]:
    if isinstance(value, str):
        if len(value) > MAX_STOP_SEQUENCES * (MAX_STOP_SEQUENCE_CHARS + 1):
            raise bad(f"is {len(value)} characters: at most {MAX_STOP_SEQUENCES} sequences of at most "
                      f"{MAX_STOP_SEQUENCE_CHARS} characters")
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise bad("must be a comma-separated string or a list of strings")
    stops = tuple(s for s in value if s)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad(f"at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    long = next((s for s in stops if len(s) > MAX_STOP_SEQUENCE_CHARS), None)
    if long is not None:
        raise bad(f"each at most {MAX_STOP_SEQUENCE_CHARS} characters, got one of {len(long)}")
    return stops


def bounded_new_tokens(ref: str, context: int | None, prompt_tokens: int,
                       max_new_tokens: int) -> tuple[int, str | None]:
    """``max_new_tokens`` held within the model's ``context`` (None: unknown, no bound), and a note when the
    answer will stop early. A prompt that fills the context, or a request for more new tokens than the context
    has at all, is refused; a prompt plus answer that would run past it stops at its end (the note says so)."""
    if context is None:
        return max_new_tokens, None
    if max_new_tokens > context:
        raise UsageError(f"max_new_tokens {max_new_tokens} is more than {ref}'s context of {context} tokens",
                         f"ask for at most {context - min(prompt_tokens, context - 1)}")
    if prompt_tokens >= context:
        raise UsageError(f"the prompt is {prompt_tokens} tokens, which fills {ref}'s context of {context} tokens "
                         "(prompt and output together)", "shorten the prompt")
    if prompt_tokens + max_new_tokens > context:
        return context - prompt_tokens, (f"the answer stops after {context - prompt_tokens} new tokens, where the "
                                         f"prompt ({prompt_tokens} tokens) and the answer fill the model's context "
                                         f"of {context} tokens")
    return max_new_tokens, None

