"""The prediction (generation) input, defined once as pydantic models: a field with its type, default, range and
description per input.

Everything else is derived from these models: a version's ``openapi_schema`` (:func:`finetune.serving.schema.
openapi_schema`, their JSON schema), the check of a prediction's input (:func:`finetune.serving.schema.
check_input`, their validation, its problems named ``input.FIELD``), the playground's errors by field, and the
defaults the CLI and Python API generate with. Adding an input is one field here.

- :class:`SamplingOptions`: how to generate (max_new_tokens, temperature, top_p, top_k, seed, stop_sequences);
- :class:`GenerationInput`: a prompt and the options (a version trained on text or instructions);
- :class:`ChatInput`: a prompt or a conversation (``messages``), a system prompt, and the options;
- :class:`WebhookOptions`: the webhook fields of a request that creates a prediction or a training.

No torch here: the server imports this module on its request path.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..errors import UsageError

# The real ranges of the inputs. Outside them sampling breaks for everyone in a batch, not only the caller: a
# temperature of 1e-300 turns logits into inf (a NaN distribution), a seed past 2**63-1 overflows torch's.
MAX_NEW_TOKENS = 1 << 20  # generation also stops at the model's context, whatever this says
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_TOP_K = 1 << 20  # past any vocabulary
MAX_SEED = 2**63 - 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_MESSAGES = 1024


@dataclass(frozen=True)
class Accepts:
    """The accepted values in words, for a field whose range is more than its bounds (in its ``Annotated``
    metadata; pydantic ignores it, the error messages use it)."""

    words: str


_FLOAT = {"allow_inf_nan": False}  # strict, an int is a fine float; a string or bool is not


class Message(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: StrictStr
    content: StrictStr


# A list once checked; given as a comma-separated string (Replicate's pages show a text box) or a JSON list
StopSequences = Annotated[list[StrictStr], WithJsonSchema({"type": "string"})]


class SamplingOptions(BaseModel):
    """How to generate: the options every version takes. Defaults are those of
    :class:`finetune.inference.GenerationSettings` (a test compares them)."""

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


def _nonblank(value: str | None, info: ValidationInfo) -> str | None:
    """A prompt of only spaces is refused, except by a base version (raw text: spaces are text too)."""
    fmt = (info.context or {}).get("prompt_format")
    if value is not None and not value.strip() and fmt not in (None, "text"):
        raise PydanticCustomError("input_empty", "is empty")
    return value


class _Prompt(BaseModel):
    prompt: StrictStr = Field(title="Prompt", description="The text to continue (or the user turn), formatted as "
                                                          "the version was trained.")
    prompt_not_blank = field_validator("prompt")(_nonblank)


class GenerationInput(SamplingOptions, _Prompt):
    """The input of a version trained on text or instructions: a prompt and the sampling options."""


class _Conversation(BaseModel):
    prompt: StrictStr | None = Field(None, title="Prompt", description="The text to continue (or the user turn), "
                                                                       "formatted as the version was trained.")
    system_prompt: StrictStr | None = Field(None, title="System Prompt",
                                            description="A system message placed before the prompt.")
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES, title="Messages",
                                           description="A whole conversation, [{role, content}, ...], instead of "
                                                       "prompt.")
    prompt_not_blank = field_validator("prompt")(_nonblank)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> _Conversation:
        problem = conversation_problem(self.prompt is not None, self.messages is not None)
        if problem is not None:
            raise PydanticCustomError("input_either", problem[1], {"field": problem[0]})
        return self


def conversation_problem(prompt: bool, messages: bool) -> tuple[str, str] | None:
    """(field, problem) when a chat input gives neither or both of a prompt and messages (their presence)."""
    if prompt and messages:
        return "messages", "give either prompt or messages, not both"
    if not prompt and not messages:
        return "prompt", "is required (give prompt or messages)"
    return None


class ChatInput(SamplingOptions, _Conversation):
    """The input of a version trained on chat messages: a prompt or a whole conversation, a system prompt, and
    the sampling options."""


def input_model(chat: bool) -> type[GenerationInput] | type[ChatInput]:
    """The input model of a version; ``chat``: trained on messages."""
    return ChatInput if chat else GenerationInput


# ------------------------------------------------------------------------- the request's options beside its input
WebhookEvent = Literal["start", "output", "logs", "completed"]
WEBHOOK_EVENTS: tuple[str, ...] = typing.get_args(WebhookEvent)
EventsFilter = Annotated[list[WebhookEvent], Field(max_length=len(WEBHOOK_EVENTS))]


class WebhookOptions(BaseModel):
    """Where a prediction's or training's progress is sent, and which events (Replicate's fields); the body of
    a request that creates one adds its own fields to these."""

    model_config = ConfigDict(extra="forbid")
    webhook: str | None = None
    webhook_completed: str | None = None  # Replicate's older spelling of "webhook, completed only"
    webhook_events_filter: EventsFilter | None = None


_EVENTS_FILTER: TypeAdapter[list[str] | None] = TypeAdapter(EventsFilter | None)


def check_events_filter(events: Any) -> list[str] | None:
    """``events`` checked as a webhook's event filter (what :class:`WebhookOptions` accepts), for callers that
    are not given a request body; a UsageError naming the first event that is not one."""
    try:
        return _EVENTS_FILTER.validate_python(events)
    except ValidationError as err:
        first = err.errors()[0]
        hint = f"choose from {', '.join(WEBHOOK_EVENTS)}"
        if first["type"] == "literal_error":
            raise UsageError(f"webhook_events_filter: unknown event {str(first['input'])[:40]!r}", hint) from None
        raise UsageError(f"webhook_events_filter: expected a list of at most {len(WEBHOOK_EVENTS)} events",
                         hint) from None


def defaults() -> dict[str, Any]:
    """The sampling options' defaults (``{"max_new_tokens": 128, ...}``), those left out of an input take."""
    return {name: info.default for name, info in SamplingOptions.model_fields.items()
            if name not in ("seed", "stop_sequences")}
