"""How an exported GGUF formats prompts: the chat template it embeds, and the Ollama ``Modelfile`` beside it.

A version trained on chat messages embeds the chat template it was trained with. A version trained on a prompt
format embeds that format as a chat template: each user message becomes the training prompt (for Alpaca, the
instruction inside the Alpaca scaffolding, ending in ``### Response:``; for prompt/completion and text data, the
message as it is), each assistant message its completion and eos. A single user message therefore renders
exactly the prompt ``finetune predict`` builds. System messages are dropped: prompt formats have no place for them.

Ollama renders prompts with Go templates, not Jinja, so the ``Modelfile`` carries a ``TEMPLATE`` derived from the
Jinja template: render a probe conversation whose contents are markers, read each role's text around them, and
keep the result only if it renders the probes exactly as Jinja does. A template that does not fit the
"prefix, content, end of turn" shape (one that moves the system prompt into the first user turn, say) gets no
``TEMPLATE``, and Ollama falls back to recognising the embedded chat template itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .data.formats import ALPACA_NO_INPUT

_CHAT_LOOP = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- USER -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def prompt_format_template(fmt: str, adds_bos: bool) -> str:
    """A Jinja chat template that renders a user message as format ``fmt`` renders a prompt."""
    if fmt == "alpaca":
        before, after = ALPACA_NO_INPUT.split("{instruction}")
        user = f"{json.dumps(before)} + message['content'] + {json.dumps(after)}"
    else:  # prompt_completion, text, and a base model without a template: the text as it is
        user = "message['content']"
    return ("{{- bos_token -}}" if adds_bos else "") + _CHAT_LOOP.replace("USER", user)


# transformers' {% generation %} blocks mark what a model learns; other Jinja engines (llama.cpp's, llama-cpp-python's)
# do not know the tag, and it prints nothing itself
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def portable_template(tokenizer: Any, template: str) -> str:
    """``template`` without transformers-only ``{% generation %}`` tags, when it renders the same without them."""
    plain = _GENERATION_TAG.sub("", template)
    if plain == template:
        return template
    probes = [[{"role": "user", "content": "a"}], [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                                   {"role": "assistant", "content": "b"}]]
    try:
        same = all(tokenizer.apply_chat_template(p, chat_template=t, tokenize=False, add_generation_prompt=g)
                   == tokenizer.apply_chat_template(p, chat_template=template, tokenize=False, add_generation_prompt=g)
                   for p in probes for g in (True, False) for t in (plain,))
    except Exception:  # a template that refuses a probe: keep it as it is
        return template
    return plain if same else template


# ------------------------------------------------------------------ Ollama
_MARK = {"system": "\x01SYSTEM\x01", "user": "\x01USER{}\x01", "assistant": "\x01ASSISTANT\x01"}


@dataclass
class Turns:
    """A conversation format: ``head``, then per message ``prefix + content + suffix`` of its role (roles
    without an entry are dropped), then ``generation`` (what opens the assistant's answer)."""

    head: str
    roles: dict[str, tuple[str, str]]
    generation: str

    def render(self, messages: list[dict[str, str]]) -> str:
        body = "".join(self.roles[m["role"]][0] + m["content"] + self.roles[m["role"]][1]
                       for m in messages if m["role"] in self.roles)
        return self.head + body + self.generation

    def go_template(self) -> str:
        """The same format for Ollama: one line of literals and actions without trimming markers (``{{-``
        would eat the whitespace that ends a turn), so :meth:`render` is exactly what it prints."""
        branches = "".join(
            f'{{{{ {"if" if k == 0 else "else if"} eq .Role "{role}" }}}}'
            f"{_go_literal(prefix)}{{{{ .Content }}}}{_go_literal(suffix)}"
            for k, (role, (prefix, suffix)) in enumerate(self.roles.items()))
        return (f"{_go_literal(self.head)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}"
                f"{_go_literal(self.generation)}")


def prompt_format_turns(fmt: str, eos: str) -> Turns:
    """:func:`prompt_format_template`'s format as :class:`Turns` (without bos: Ollama adds it)."""
    if fmt == "alpaca":
        before, after = ALPACA_NO_INPUT.split("{instruction}")
        return Turns("", {"user": (before, after), "assistant": ("", eos)}, "")
    return Turns("", {"user": ("", ""), "assistant": ("", eos)}, "")


def ollama_template(tokenizer: Any, template: str, bos_text: str | None, turns: Turns | None = None) -> str | None:
    """The Go template that renders conversations as the Jinja ``template`` does, or None when none was found.

    ``turns`` is the format when it is known (a prompt format), else it is read from renders of probe
    conversations. Either way it is kept only if it renders the probes exactly as Jinja does. ``bos_text`` is
    left out: Ollama adds the bos token itself when the GGUF says so.
    """
    def render(messages: list[dict[str, str]]) -> str:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        return text[len(bos_text):] if bos_text and text.startswith(bos_text) else text

    plain = [{"role": "user", "content": _MARK["user"].format(1)},
             {"role": "assistant", "content": _MARK["assistant"]},
             {"role": "user", "content": _MARK["user"].format(2)}]
    with_system = [{"role": "system", "content": _MARK["system"]}, *plain]
    try:
        for candidate in [turns] if turns is not None else _derive(render, plain, with_system):
            probes = [plain] + ([with_system] if "system" in candidate.roles else [])
            if all(candidate.render(messages) == render(messages) for messages in probes):
                return candidate.go_template()
    except Exception:  # a template that refuses a probe: no TEMPLATE, Ollama recognises the GGUF's own
        pass
    return None


def _derive(render: Any, plain: list[dict[str, str]], with_system: list[dict[str, str]]) -> list[Turns]:
    """Candidate readings of a chat template's turns, off renders of ``plain`` (user, assistant, user) and
    ``with_system``: first as turns that end alike whatever their role (<|im_end|>, <|eot_id|>, <end_of_turn>),
    then as turns whose user part ends differently from the assistant's (Llama 2's ``[/INST]`` and ``</s>``)."""
    pieces = _split(render(plain), [m["content"] for m in plain])
    if pieces is None:
        return []
    head_user, user_end_asst, asst_end_user, user_end_gen = pieces
    try:
        system = _split(render(with_system), [m["content"] for m in with_system])
    except Exception:  # a template without system turns
        system = None
    candidates = []
    end = _common_prefix([user_end_asst, asst_end_user, user_end_gen])
    # What every turn starts with (<|im_start|>, <|start_header_id|>) belongs to the next turn, not to this
    # one's end: the first turn, after the head, starts with it too.
    for cut in range(len(end)):
        if end[cut:] and end[cut:] in head_user:
            end = end[:cut]
            break
    user_prefix = asst_end_user[len(end):]
    if head_user.endswith(user_prefix):
        head = head_user[:len(head_user) - len(user_prefix)]
        roles = {"user": (user_prefix, end), "assistant": (user_end_asst[len(end):], end)}
        candidates.append(_with_system(Turns(head, roles, user_end_gen[len(end):]), system))
    user_end = _common_prefix([user_end_asst, user_end_gen])
    user_prefix = _common_suffix([head_user, asst_end_user])
    head = head_user[:len(head_user) - len(user_prefix)]
    roles = {"user": (user_prefix, user_end),
             "assistant": (user_end_asst[len(user_end):], asst_end_user[:len(asst_end_user) - len(user_prefix)])}
    candidates.append(_with_system(Turns(head, roles, user_end_gen[len(user_end):]), system))
    return candidates


def _with_system(turns: Turns, parts: list[str] | None) -> Turns:
    """``turns`` with a system role, when the render with a system message fits the same reading."""
    user_prefix = turns.roles["user"][0]
    if parts is not None and parts[0].startswith(turns.head) and parts[1].endswith(user_prefix):
        system = (parts[0][len(turns.head):], parts[1][:len(parts[1]) - len(user_prefix)])
        return Turns(turns.head, {"system": system, **turns.roles}, turns.generation)
    return turns


def _split(text: str, contents: list[str]) -> list[str] | None:
    """The text around each content marker, in order; None when a marker is missing or altered."""
    pieces, rest = [], text
    for content in contents:
        before, found, rest = rest.partition(content)
        if not found:
            return None
        pieces.append(before)
    return [*pieces, rest]


def _common_prefix(texts: list[str]) -> str:
    first = texts[0]
    n = 0
    while n < len(first) and all(len(t) > n and t[n] == first[n] for t in texts):
        n += 1
    return first[:n]


def _common_suffix(texts: list[str]) -> str:
    return _common_prefix([t[::-1] for t in texts])[::-1]


def _go_literal(text: str) -> str:
    # Text of a Go template is literal except for "{{"; a quoted action prints anything else verbatim.
    return text if "{{" not in text else "{{ " + json.dumps(text) + " }}"


def modelfile(gguf_name: str, go_template: str | None, stops: list[str], title: str) -> str:
    """An Ollama ``Modelfile`` for the GGUF file ``gguf_name`` in the same folder."""
    lines = [f"# {title}", "# ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}"]
    if go_template is not None:
        lines.append(f'TEMPLATE """{go_template}"""')
    else:
        lines.append("# No TEMPLATE: Ollama recognises the chat template embedded in the GGUF file.")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"
