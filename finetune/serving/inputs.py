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
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..errors import UsageError
from ..generation import MAX_MESSAGES, SamplingOptions


class Message(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: StrictStr
    content: StrictStr


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


class _Raw(BaseModel):
    raw_prompt: StrictBool = Field(False, title="Raw Prompt",
                                   description="Take the prompt as it is, not formatted as the version was trained "
                                               "(a plain continuation; the OpenAI API's completions send it).")

    @model_validator(mode="after")
    def _prompt_only(self) -> _Raw:
        if self.raw_prompt and getattr(self, "messages", None) is not None:
            raise PydanticCustomError("input_either", "applies to prompt, not to messages", {"field": "raw_prompt"})
        return self


class GenerationInput(_Raw, SamplingOptions, _Prompt):
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


class ChatInput(_Raw, SamplingOptions, _Conversation):
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
