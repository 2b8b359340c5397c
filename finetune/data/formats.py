"""Prompt formats: render records and prompts as training saw them, and tokenize them with loss masks.

Every example becomes ``input_ids`` and ``labels`` of equal length, ``-100`` where no loss is taken. Masks
come from *where text came from*, never from comparing token ids to pad/eos ids: the prompt and the
completion are tokenized separately and concatenated, so the prompt's ids are exactly what inference feeds
the model (:func:`encode_prompt` on :func:`prompt_for`'s text). Chat data is rendered with the tokenizer's
own chat template; assistant spans are found by rendering the conversation incrementally and diffing, which
works for any template whose renders extend each other.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

from ..choices import FORMATS
from ..errors import DataError, UsageError, one_line

# Labels at positions that take no loss (the prompt, padding); PyTorch's cross-entropy skips them.
IGNORE_INDEX = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Per format, in detection order (most specific first): the column sets that qualify, and how to say so.
# Preference rows (train.method: dpo; see data.preference): TRL's layout, and OpenAI's preference JSONL.
PREFERENCE_COLUMNS = ({"prompt", "chosen", "rejected"}, {"input", "preferred_output", "non_preferred_output"})
_COLUMNS = {
    "preference": (list(PREFERENCE_COLUMNS), "'prompt', 'chosen' and 'rejected' (or OpenAI's 'input', "
                   "'preferred_output' and 'non_preferred_output')"),
    "messages": ([{"messages"}, {"conversations"}], "'messages' (or 'conversations')"),
    "alpaca": ([{"instruction", "output"}], "'instruction' and 'output' ('input' optional)"),
    "prompt_completion": ([{"prompt", "completion"}], "'prompt' and 'completion'"),
    "text": ([{"text"}], "'text'"),
}
_ROLES = ("system", "user", "assistant", "tool", "developer")
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


def detect_format(columns: Sequence[str]) -> str:
    """The prompt format that ``columns`` fit; the most specific wins (alpaca data often carries a 'text' too)."""
    for fmt, (options, _) in _COLUMNS.items():
        if any(need <= set(columns) for need in options):
            return fmt
    needs = "; ".join(f"{fmt} needs {what}" for fmt, (_, what) in _COLUMNS.items())
    raise DataError(f"cannot tell the data format from columns {sorted(columns)}", needs)


def _check_columns(fmt: str, columns: Sequence[str], path: str) -> None:
    options, what = _COLUMNS[fmt]
    if not any(need <= set(columns) for need in options):
        raise DataError(f"{path}: format {fmt} needs {what}, but the columns are {sorted(columns)}",
                        "rename the columns or set format: auto")


class _Bad(Exception):
    """A record-level problem; the caller adds where the record came from."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def _field(record: dict, name: str, fmt: str, optional: bool = False) -> str:
    value = record.get(name)
    if value is None:
        if optional:
            return ""
        # Arrow gives absent keys and JSON null the same None: the message has to cover both.
        raise _Bad(f"field '{name}' is missing or null", f"{fmt} records need {_COLUMNS[fmt][1]}")
    if not isinstance(value, str):
        raise _Bad(f"field '{name}' must be a string, got {type(value).__name__}", "quote the value")
    return value


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _Bad("field 'messages' must be a non-empty list of {role, content} objects")
    out = []
    for k, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise _Bad(f"message {k} is a {type(m).__name__}, not an object")
        m = {key: v for key, v in m.items() if v is not None}  # arrow fills absent keys with None
        if "role" not in m and "from" in m:  # ShareGPT style
            m = {"role": _SHAREGPT_ROLES.get(m.pop("from"), None), "content": m.pop("value", None), **m}
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Bad(f"message {k} needs string 'role' and 'content'", "use {\"role\": ..., \"content\": ...}")
        if m["role"] not in _ROLES:
            # Templates accept more roles than ours, but one a letter or two from a known role is a typo that
            # would silently drop the turn from training (an assistent turn learns nothing).
            close = difflib.get_close_matches(m["role"], _ROLES, n=1, cutoff=0.75)
            if close:
                raise _Bad(f"message {k} has role '{m['role']}'", f"did you mean '{close[0]}'?")
        out.append(m)
    return out


def _render(tokenizer: Any, messages: list[dict], generation: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise _Bad("the tokenizer has no chat template, so 'messages' data cannot be rendered",
                   "use format: text with pre-rendered conversations, or a base model whose tokenizer has a template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as err:
        raise _Bad(f"the chat template rejects this conversation: {one_line(err)}") from err


def _chat_segments(tokenizer: Any, messages: list[dict]) -> list[tuple[str, bool]]:
    full = _render(tokenizer, messages, False)
    segments, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not any(turn["role"] != "system" for turn in messages[:i]):
            # An answer to nothing: the template would be asked to render an empty prompt for it.
            raise _Bad(f"message {i + 1} is an assistant turn with no user turn before it",
                       "start the conversation with a user turn (after an optional system turn)")
        before = _render(tokenizer, messages[:i], True)
        after = _render(tokenizer, messages[: i + 1], False)
        # The renders must extend one another; otherwise offsets in one do not locate text in the other.
        if not (len(before) >= done and after.startswith(before) and full.startswith(after)):
            raise _Bad(f"the chat template renders turn {i + 1} differently once later turns follow, so assistant "
                       "tokens cannot be located", "use format: text with pre-rendered conversations")
        segments += [(full[done:len(before)], False), (full[len(before):len(after)], True)]
        done = len(after)
    return segments + [(full[done:], False)]


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt, ending in ``### Response:\\n``; the no-input variant when input is blank."""
    if input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _segments(record: dict, fmt: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """The record's text as (piece, learned) in order; the first piece is the prompt."""
    if fmt == "alpaca":
        prompt = alpaca_prompt(_field(record, "instruction", fmt), _field(record, "input", fmt, optional=True))
        return [(prompt, False), (_field(record, "output", fmt), True)]
    if fmt == "prompt_completion":
        return [(_field(record, "prompt", fmt), False), (_field(record, "completion", fmt), True)]
    if fmt == "text":
        return [(_field(record, "text", fmt), True)]
    if fmt == "messages":
        value = record.get("messages") if record.get("messages") is not None else record.get("conversations")
        return _chat_segments(tokenizer, _messages(value))
    if fmt == "preference":
        raise _Bad("preference rows (a chosen and a rejected answer) train with train.method: dpo",
                   "set train.method: dpo, or give supervised rows (completion, output or messages)")
    raise UsageError(f"unknown data format '{fmt}'", "use one of " + ", ".join(FORMATS))


def prompt_for(fmt: str, tokenizer: Any, prompt: str | list[dict], system: str | None = None) -> str:
    """The text training placed before the completion, for a user's raw prompt (inference side).

    Tokenize it with :func:`encode_prompt` to get the ids training used.
    """
    if fmt == "messages":
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        try:
            return _render(tokenizer, _messages(messages), True)
        except _Bad as bad:
            raise DataError(f"prompt: {bad.message}", bad.hint) from None
    if system is not None or not isinstance(prompt, str):
        raise UsageError(f"format {fmt} takes one plain-text prompt and no system prompt",
                         "only models trained on messages data accept a system prompt or a conversation")
    if fmt == "alpaca":
        return alpaca_prompt(prompt)
    if fmt in ("prompt_completion", "text"):
        return prompt
    raise UsageError(f"unknown data format '{fmt}'", "use one of " + ", ".join(f for f in FORMATS if f != "auto"))


def _bos_ids(tokenizer: Any) -> list[int]:
    """The special ids the tokenizer puts *before* text (bos), never those it appends (an eos mid-sequence)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return list(full[:k])
    raise DataError("the tokenizer alters text when adding special tokens", "use a tokenizer with a standard template")


def encode_prompt(fmt: str, tokenizer: Any, prompt_text: str) -> list[int]:
    """Token ids of :func:`prompt_for`'s text, exactly as training tokenized that prompt.

    Chat templates write their own bos, so rendered chats get no special tokens (as in transformers'
    ``apply_chat_template(tokenize=True)``); other formats get the tokenizer's leading bos, if it adds one.
    """
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return list(ids) if fmt == "messages" else _bos_ids(tokenizer) + list(ids)


def _encode_many(records: list[dict], fmt: str, tokenizer: Any, train_on_inputs: bool,
                 where: Callable[[int], str]) -> list[tuple[list[int], list[int]]]:
    """Encode records with one batched tokenizer call; ``where(j)`` names record j for errors."""
    pieces: list[list[tuple[str, bool]]] = []
    for j, record in enumerate(records):
        try:
            pieces.append(_segments(record, fmt, tokenizer))
        except _Bad as bad:
            raise DataError(f"{where(j)}: {bad.message}", bad.hint) from None
    flat = [text for segs in pieces for text, _ in segs]
    tokens = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    chat = fmt == "messages"
    bos = [] if chat else _bos_ids(tokenizer)
    eos = tokenizer.eos_token_id
    if not chat and eos is None:
        raise DataError("the tokenizer has no eos token, so completions cannot learn to stop",
                        "set eos_token in the tokenizer config")
    out = []
    for segs in pieces:
        learn_bos = train_on_inputs or segs[0][1]
        ids, labels = list(bos), (list(bos) if learn_bos else [IGNORE_INDEX] * len(bos))
        for _, learned in segs:
            piece = list(next(tokens))
            ids += piece
            labels += piece if (learned or train_on_inputs) else [IGNORE_INDEX] * len(piece)
        if not chat:  # the completion ends in eos, and eos is learned: that is how the model learns to stop
            ids.append(eos)
            labels.append(eos)
        out.append((ids, labels))
    return out


def encode_record(record: dict, fmt: str, tokenizer: Any, train_on_inputs: bool,
                  where: str = "record") -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one record; labels are -100 where no loss is taken."""
    fmt = detect_format(list(record)) if fmt == "auto" else fmt
    return _encode_many([record], fmt, tokenizer, train_on_inputs, lambda _: where)[0]




def record_segments(record: dict, fmt: str, tokenizer: Any = None) -> list[tuple[str, bool]]:
    """The record's text exactly as training renders it, as ``(piece, learned)`` pairs in order.

    ``learned`` marks the pieces that take loss (the completion, the assistant turns). ``fmt`` may be ``auto``;
    a ``tokenizer`` is needed only for ``messages`` data (its chat template renders the conversation). Used to
    preview data before training; raises :class:`DataError` naming what is wrong with the record.
    """
    fmt = detect_format(list(record)) if fmt == "auto" else fmt
    if fmt == "preference":
        from .preference import preview_pieces

        return preview_pieces(record, tokenizer)
    try:
        return _segments(record, fmt, tokenizer)
    except _Bad as bad:
        raise DataError(bad.message, bad.hint) from None
