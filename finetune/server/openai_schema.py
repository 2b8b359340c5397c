"""The OpenAI API's requests, as ``finetune serve`` takes them under ``/openai/v1`` (see routes/openai.py).

Each request becomes the input of a prediction (:meth:`CompletionRequest.prediction_input`), which the
prediction service checks against the version's schema and the server's limits exactly as it checks
``POST /v1/predictions``: the ranges live there, once. This module only maps names (``max_tokens`` ->
``max_new_tokens``, ``stop`` -> ``stop_sequences``) and refuses what our decoding cannot do (``n`` > 1,
penalties, logprobs, tools), naming the parameter. The errors go out in OpenAI's shape (:func:`error_body`).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator

from ..serving.schema import DEFAULT_MAX_NEW_TOKENS


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or error_type(status)


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    if status == 403:
        return "permission_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(err: OpenAIError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}


_T = TypeVar("_T")


def _neutral(name: str, value: _T, neutral: tuple[Any, ...]) -> _T:
    if value not in neutral:
        raise ValueError(f"not supported by this server (leave {name} out)")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """The parameters ``chat/completions`` and ``completions`` share. Unknown parameters are a 400 naming them;
    ones our decoding does not have are accepted only at their neutral value (what clients send by default)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported (one choice per request)")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None, info: Any) -> float | None:
        return _neutral(info.field_name, value, (None, 0, 0.0))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _neutral("logit_bias", value or None, (None,))

    def limit(self) -> int | None:
        return self.max_tokens

    def limit_param(self) -> str:
        return "max_tokens"

    def max_new_tokens(self) -> int:
        """The most tokens this request lets the version generate (the prediction's default when not given)."""
        limit = self.limit()
        return DEFAULT_MAX_NEW_TOKENS if limit is None else limit

    def generation_input(self) -> dict[str, Any]:
        """The prediction input's generation settings; those not given keep the prediction's defaults (greedy)."""
        data: dict[str, Any] = {}
        if self.limit() is not None:
            data["max_new_tokens"] = self.limit()
        for name in ("temperature", "top_p", "seed"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.stop is not None:
            data["stop_sequences"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return data

    def param_of(self, input_field: str) -> str:
        """The request parameter a prediction input field came from, for an error that names the field."""
        return {"max_new_tokens": self.limit_param(), "stop_sequences": "stop", "system_prompt": "messages",
                }.get(input_field, input_field)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; ``developer`` is read as ``system``; content is a string or a list of text parts."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    """The body of ``POST /openai/v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: Any, info: Any) -> Any:
        return _neutral(info.field_name, value, (None, False, 0))

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        return _neutral("tools", value or None, (None,))

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | None) -> str | None:
        return _neutral("tool_choice", value, (None, "none", "auto"))

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _neutral("response_format", value, (None, {"type": "text"}))

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def prediction_input(self, prompt_format: str) -> dict[str, Any]:
        """The prediction's input: the messages for a version trained on chat data (its chat template renders
        them), or, for one trained on prompt/completion data, the one user message's text as the prompt."""
        data = self.generation_input()
        if prompt_format == "messages":
            data["messages"] = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                                for m in self.messages]
            return data
        if len(self.messages) != 1 or self.messages[0].role != "user":
            raise OpenAIError(400, f"this version takes a prompt in its {prompt_format} format, not a conversation: "
                                   "send one user message (its text is the prompt, formatted as in training), or "
                                   "use /completions", param="messages")
        data["prompt"] = self.messages[0].text()
        return data

    def param_of(self, input_field: str) -> str:
        return "messages" if input_field == "prompt" else super().param_of(input_field)


class CompletionRequest(_Request):
    """The body of ``POST /openai/v1/completions``: one prompt, a string (or a list holding one)."""

    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt per request (a string, or a list holding one string)")
        return value

    @field_validator("echo", "best_of", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        neutral = {"echo": (None, False), "best_of": (None, 1), "logprobs": (None,), "suffix": (None, "")}
        return _neutral(info.field_name, value, neutral[info.field_name])

    def prediction_input(self, prompt_format: str) -> dict[str, Any]:
        """The prediction's input: the prompt as it is (``raw_prompt``), not in the version's training format."""
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return {"prompt": prompt, "raw_prompt": True, **self.generation_input()}
