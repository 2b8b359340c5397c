"""How to generate: the one definition of the generation options, their defaults, ranges and check.

:class:`SamplingOptions` (a pydantic model) is that definition. Everything else derives from it: the HTTP API's
input models extend it (:mod:`finetune.serving.inputs`, and a version's ``openapi_schema`` from them), ``finetune
predict``/``chat`` derive their flags from :data:`OPTIONS`, and :func:`check_settings` validates with it, naming a
bad option the way its caller spells it (``--top-p``, ``input.top_p``). What the engine is given is the checked
result, a :class:`GenerationSettings`. Every way of running a model generates through one engine
(:mod:`finetune.decoding.engine`).

No torch here: the server imports this module on its request path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from .errors import UsageError

# The real ranges of the inputs. Outside them sampling breaks for everyone in a batch, not only the caller: a
# temperature of 1e-300 turns logits into inf (a NaN distribution), a seed past 2**63-1 overflows torch's.
MAX_NEW_TOKENS = 1 << 20  # generation also stops at the model's context, whatever this says
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_TOP_K = 1 << 20  # past any vocabulary
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_MESSAGES = 1024  # of a conversation (an input of versions trained on chat)


@dataclass(frozen=True)
class Accepts:
    """The accepted values in words, for a field whose range is more than its bounds (in its ``Annotated``
    metadata; pydantic ignores it, the error messages use it)."""

    words: str


_FLOAT = {"allow_inf_nan": False}  # strict, an int is a fine float; a string or bool is not


# A list once checked; given as a comma-separated string (Replicate's pages show a text box) or a JSON list
StopSequences = Annotated[list[StrictStr], WithJsonSchema({"type": "string"})]


class SamplingOptions(BaseModel):
    """How to generate: the options every version takes, every caller (CLI flags, Python, the HTTP APIs)."""

    model_config = ConfigDict(strict=True, extra="forbid", title="Input")

    max_new_tokens: StrictInt = Field(128, ge=1, le=MAX_NEW_TOKENS, title="Max New Tokens",
                                      description="The most tokens to generate (capped by the model's context).")
    temperature: Annotated[float, Accepts(f"0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")] = Field(
        0.0, ge=0, le=MAX_TEMPERATURE, title="Temperature", **_FLOAT,
        description=f"0 is greedy decoding; from {MIN_TEMPERATURE} up, higher samples more freely.")
    top_p: float = Field(1.0, gt=0, le=1, title="Top P", **_FLOAT,
                         description="Sample from the smallest set of tokens whose probabilities add up to top_p.")
    top_k: Annotated[StrictInt, Accepts(f"0 (no limit) up to {MAX_TOP_K}")] = Field(
        0, ge=0, le=MAX_TOP_K, title="Top K", description="Sample from the k most likely tokens only (0: no limit).")
    seed: Annotated[StrictInt | None, Accepts(f"between 0 and {MAX_SEED} (2**63-1)")] = Field(
        None, ge=0, le=MAX_SEED, title="Seed", description="Makes sampling repeatable.")
    stop_sequences: StopSequences = Field(
        "", validate_default=True, title="Stop Sequences",
        description=f"Comma-separated texts that end the output when generated (not included); a JSON list of "
                    f"strings is accepted too. At most {MAX_STOP_SEQUENCES}, each at most {MAX_STOP_SEQUENCE_CHARS} "
                    f"characters.")

    @field_validator("temperature")
    @classmethod
    def _not_tiny(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise PydanticCustomError("input_range", "must be {words}", {"words": accepted_values(cls, "temperature")})
        return value

    @field_validator("stop_sequences", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            if len(value) > MAX_STOP_SEQUENCES * (MAX_STOP_SEQUENCE_CHARS + 1):
                raise PydanticCustomError("input_size", f"is {len(value)} characters: at most {MAX_STOP_SEQUENCES} "
                                                      f"sequences of at most {MAX_STOP_SEQUENCE_CHARS} characters")
            return value.split(",")
        if isinstance(value, tuple):  # a GenerationSettings' own
            value = list(value)
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise PydanticCustomError("input_type", "must be a comma-separated string or a list of strings")
        return value

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str]) -> list[str]:
        stops = [s for s in value if s]
        if len(stops) > MAX_STOP_SEQUENCES:
            raise PydanticCustomError("input_size", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
        long = next((s for s in stops if len(s) > MAX_STOP_SEQUENCE_CHARS), None)
        if long is not None:
            raise PydanticCustomError("input_size", f"each at most {MAX_STOP_SEQUENCE_CHARS} characters, got one "
                                                  f"of {len(long)}")
        return stops


def accepted_values(model: type[BaseModel], name: str) -> str | None:
    """The words of a field's :class:`Accepts`, if it has one."""
    info = model.model_fields.get(name)
    return next((m.words for m in info.metadata if isinstance(m, Accepts)), None) if info else None


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate. ``temperature`` 0 is greedy decoding; ``seed`` makes sampling repeatable; generation
    ends at eos, at a stop sequence (not included in the text) or after ``max_new_tokens``."""

    max_new_tokens: int = SamplingOptions.model_fields["max_new_tokens"].default
    temperature: float = SamplingOptions.model_fields["temperature"].default
    top_p: float = SamplingOptions.model_fields["top_p"].default
    top_k: int = SamplingOptions.model_fields["top_k"].default
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()

    def check(self) -> GenerationSettings:
        """These settings checked (:func:`check_settings`); raises :class:`UsageError` naming a bad one."""
        return check_settings(asdict(self))


@dataclass(frozen=True)
class Option:
    """One generation option as the CLI shows it (from :class:`SamplingOptions`)."""

    name: str
    kind: type  # int, float or str
    description: str


def _options() -> dict[str, Option]:
    kinds = {"integer": int, "number": float, "string": str}
    props = SamplingOptions.model_json_schema()["properties"]
    out = {}
    for name, info in SamplingOptions.model_fields.items():
        types = [t.get("type") for t in props[name].get("anyOf", [props[name]])]
        out[name] = Option(name, kinds[next(t for t in types if t in kinds)], info.description or "")
    return out


OPTIONS: dict[str, Option] = _options()
DEFAULTS = GenerationSettings()


def flag(field: str) -> str:
    """The CLI flag of an option: ``--top-p``."""
    return "--" + field.replace("_", "-")


def _same(field: str) -> str:
    return field


def check_settings(values: Mapping[str, Any], name: Callable[[str], str] = _same,
                   hint: str | None = None) -> GenerationSettings:
    """Settings from raw option values (absent or None: the default), checked by :class:`SamplingOptions`.

    Raises :class:`UsageError` for the first bad one, naming it as ``name(option)`` (e.g. ``input.top_p`` or
    ``--top-p``), with ``hint``. ``stop_sequences`` is a comma-separated string or a list of strings.
    """
    given = {k: v for k, v in values.items() if v is not None}
    try:
        checked = SamplingOptions.model_validate(given)
    except ValidationError as err:
        field, problem = problems(SamplingOptions, err)[0]
        raise UsageError(f"{name(field)}: {problem}", hint) from None
    return settings_of(checked.model_dump())


def settings_of(options: Mapping[str, Any]) -> GenerationSettings:
    """The settings in option values already checked by :class:`SamplingOptions` (or by an input model that
    extends it: a checked prediction input); other keys are left out."""
    given = {name: options[name] for name in OPTIONS if name in options}
    return GenerationSettings(**{**given, "stop_sequences": tuple(given.get("stop_sequences", ()))})


def short(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut at 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _range(model: type[BaseModel], name: str) -> str:
    """A field's accepted values in words: its :class:`Accepts`, else its bounds."""
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


def problems(model: type[BaseModel], err: ValidationError) -> list[tuple[str, str]]:
    """A validation error of an input model as (field, problem) pairs in this project's words."""
    return [_problem(model, e) for e in err.errors()]


def _problem(model: type[BaseModel], error: Any) -> tuple[str, str]:
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
        return field, f"must be {_range(model, field)}, got {short(value)}"  # an int too large for a float too
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return field, f"must be an integer, got {short(value)}"
    if kind == "finite_number":
        return field, f"must be a finite number, got {short(value)}"
    if kind in ("float_type", "float_parsing"):
        return field, f"must be a number, got {short(value)}"
    if kind == "string_type":
        return field, f"must be a string, got {type(value).__name__}"
    return field, error["msg"][:1].lower() + error["msg"][1:]


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

