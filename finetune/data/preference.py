"""Preference rows for DPO: read, check, render and tokenize pairs of answers to one prompt.

Two layouts, detected by their columns (:data:`~finetune.data.formats.PREFERENCE_COLUMNS`):

* ``{prompt, chosen, rejected}``, as TRL lays it out: three strings (plain text), or the conversational form
  where ``prompt`` is a list of messages and ``chosen``/``rejected`` are lists holding the assistant's turn(s);
* OpenAI's preference fine-tuning JSONL: ``input.messages`` (the conversation so far), ``preferred_output``
  and ``non_preferred_output`` (lists of assistant messages).

Each pair becomes two sequences, prompt + chosen and prompt + rejected, with labels only on the answer. Text
answers end in eos (the model learns to stop, as supervised training does; TRL appends it too); conversational
ones are rendered with the tokenizer's chat template, which ends turns itself. The prompt and each answer are
tokenized separately and concatenated, so the prompt's ids are exactly those inference feeds the model, as in
:mod:`~finetune.data.formats`. A version trained on text pairs answers raw prompts (format
``prompt_completion``); one trained on conversations answers chats (format ``messages``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from ..errors import DataError
from .formats import IGNORE_INDEX, _Bad, _bos_ids, _messages, _render
from .prepare import Prepared, _eval_spec, _split, dataset_fingerprint, refuse_overlong, tokenizer_fingerprint
from .records import RowLocator, read_records

_OPENAI = ("input", "preferred_output", "non_preferred_output")
_TRL = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    """One preference row, rendered: the prompt text and the two answers' texts; ``chat`` when rendered with
    the chat template (then no bos or eos is added: the template writes its own)."""

    prompt: str
    chosen: str
    rejected: str
    chat: bool


def layout(columns: list[str]) -> str:
    """``"openai"`` or ``"prompt/chosen/rejected"``, from the columns of a preference file."""
    return "openai" if set(_OPENAI) <= set(columns) else "prompt/chosen/rejected"


def _side(record: dict, name: str) -> Any:
    value = record.get(name)
    if value is None or (isinstance(value, (str, list)) and not value):
        raise _Bad(f"field '{name}' is missing, null or empty", "each preference row needs both answers and a prompt")
    return value


def _answer(value: Any, name: str) -> list[dict]:
    """A conversational answer: a list of assistant messages (a single message object is accepted too)."""
    turns = _messages([value] if isinstance(value, dict) else value)
    if any(m["role"] != "assistant" for m in turns):
        raise _Bad(f"field '{name}' must hold assistant messages only", "put the conversation so far in the prompt")
    return turns


def pair_parts(record: dict) -> tuple[str | list[dict], Any, Any]:
    """``(prompt, chosen, rejected)`` of a row in either layout: three strings, or a message list and two lists
    of assistant messages. Raises ``_Bad`` naming what is wrong (a missing side, identical answers, ...)."""
    if any(record.get(k) is not None for k in _OPENAI) and all(record.get(k) is None for k in _TRL):
        source = record.get("input")
        prompt = source.get("messages") if isinstance(source, dict) else None
        if not prompt:
            raise _Bad("field 'input.messages' is missing or empty", "OpenAI rows hold the conversation there")
        names = ("input.messages", "preferred_output", "non_preferred_output")
        prompt, chosen, rejected = prompt, _side(record, _OPENAI[1]), _side(record, _OPENAI[2])
    else:
        names = _TRL
        prompt, chosen, rejected = (_side(record, k) for k in _TRL)
    if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(rejected, str):
        raise _Bad(f"fields '{names[0]}', '{names[1]}' and '{names[2]}' mix text and message lists",
                   "use three strings, or a list of messages and two lists of assistant messages")
    if not isinstance(prompt, str):
        prompt = _messages(prompt)
        chosen, rejected = _answer(chosen, names[1]), _answer(rejected, names[2])
    if chosen == rejected:
        raise _Bad(f"'{names[1]}' and '{names[2]}' are identical: the row prefers nothing",
                   "remove the row or fix one of its answers")
    return prompt, chosen, rejected


def render_pair(record: dict, tokenizer: Any) -> Pair:
    """The row's prompt and answers as text, as training tokenizes them (see the module docstring)."""
    prompt, chosen, rejected = pair_parts(record)
    if isinstance(prompt, str):
        return Pair(prompt, chosen, rejected, chat=False)
    head = _render(tokenizer, prompt, True)
    answers = []
    for answer in (chosen, rejected):
        full = _render(tokenizer, prompt + answer, False)
        if not full.startswith(head):
            raise _Bad("the chat template renders the prompt differently once an answer follows, so the answer's "
                       "tokens cannot be located", "use text rows (prompt, chosen, rejected as strings)")
        answers.append(full[len(head):])
    return Pair(head, answers[0], answers[1], chat=True)


def encode_pairs(records: list[dict], tokenizer: Any, where: Any) -> list[dict[str, list[int]]]:
    """Token ids per row: ``prompt``, ``chosen`` and ``rejected`` (the answers with their eos). ``where(j)``
    names row j in errors."""
    pairs = []
    for j, record in enumerate(records):
        try:
            pairs.append(render_pair(record, tokenizer))
        except _Bad as bad:
            raise DataError(f"{where(j)}: {bad.message}", bad.hint) from None
    flat = [text for p in pairs for text in (p.prompt, p.chosen, p.rejected)]
    ids = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
    bos, eos = _bos_ids(tokenizer), tokenizer.eos_token_id
    if eos is None and not all(p.chat for p in pairs):
        raise DataError("the tokenizer has no eos token, so answers cannot learn to stop",
                        "set eos_token in the tokenizer config")
    out = []
    for p in pairs:
        prompt, chosen, rejected = (list(next(ids)) for _ in range(3))
        if not p.chat:
            prompt, chosen, rejected = bos + prompt, chosen + [eos], rejected + [eos]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "chat": p.chat})
    return out


_FEATURES = datasets.Features({
    **{f"{side}_{kind}": datasets.Sequence(datasets.Value("int32"))
       for side in ("chosen", "rejected") for kind in ("ids", "labels")},
    "length": datasets.Value("int32"),  # tokens of both sequences
    "raw_length": datasets.Value("int32"),  # the longer of the two sequences before truncation
    "learned": datasets.Value("int32"),  # answer tokens of the shorter answer after truncation (0: nothing left)
    "chat": datasets.Value("bool"),  # rendered with the chat template (a conversation), or plain text
})


def _sequence(prompt: list[int], answer: list[int], max_seq_len: int) -> tuple[list[int], list[int]]:
    ids = (prompt + answer)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_seq_len]
    return ids, labels


def _map_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any, max_seq_len: int,
               where: RowLocator) -> dict[str, list]:
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: dict[str, list] = {k: [] for k in _FEATURES}
    for row in encode_pairs(records, tokenizer, lambda j: where(indices[j])):
        learned = []
        for side in ("chosen", "rejected"):
            ids, labels = _sequence(row["prompt"], row[side], max_seq_len)
            out[f"{side}_ids"].append(ids)
            out[f"{side}_labels"].append(labels)
            learned.append(sum(1 for t in labels if t != IGNORE_INDEX))
        out["length"].append(len(out["chosen_ids"][-1]) + len(out["rejected_ids"][-1]))
        out["raw_length"].append(len(row["prompt"]) + max(len(row["chosen"]), len(row["rejected"])))
        out["learned"].append(min(learned))
        out["chat"].append(row["chat"])
    return out


def _encode(path: str, label: str | None, tokenizer: Any, max_seq_len: int,
            overlong: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The file's rows, and their encoding (the ``_FEATURES`` columns)."""
    records = read_records(path, label)
    where = RowLocator(path, label)
    name = label or path
    from .formats import PREFERENCE_COLUMNS

    if not any(set(option) <= set(records.column_names) for option in PREFERENCE_COLUMNS):
        raise DataError(f"{name}: train.method dpo needs preference rows, but the columns are "
                        f"{sorted(records.column_names)}",
                        "give each row 'prompt', 'chosen' and 'rejected' (or OpenAI's 'input', 'preferred_output' "
                        "and 'non_preferred_output'), or train with method: sft")
    encoded = records.map(_map_batch, batched=True, batch_size=1000, with_indices=True,
                          remove_columns=records.column_names, features=_FEATURES, keep_in_memory=True,
                          fn_kwargs=dict(tokenizer=tokenizer, max_seq_len=max_seq_len, where=where),
                          desc="tokenizing pairs")
    if overlong == "error":
        refuse_overlong(encoded, max_seq_len, where)
    chat = encoded.data.column("chat").to_numpy(zero_copy_only=False)
    other = np.flatnonzero(chat != chat[0])
    if other.size:  # a version answers either raw prompts or chats, as its rows were
        kinds = ("text", "conversation")
        raise DataError(f"{where(int(other[0]))}: a {kinds[int(chat[other[0]])]} row in a file whose first row is "
                        f"a {kinds[int(chat[0])]}", "use one layout for every row: strings, or message lists")
    return records, encoded


def _keep(encoded: datasets.Dataset, rows: np.ndarray, max_seq_len: int) -> tuple[datasets.Dataset, dict]:
    """Pairs with answer tokens left on both sides after truncation, and counts (as prepare's ``_keep``)."""
    column = lambda name: encoded.data.column(name).to_numpy()[rows]  # noqa: E731
    learned, length, raw = column("learned"), column("length"), column("raw_length")
    kept = learned > 0
    subset = encoded.select(rows[kept].tolist()).remove_columns(["raw_length", "learned", "chat"])
    answers = sum(sum(1 for t in labels if t != IGNORE_INDEX)
                  for side in ("chosen_labels", "rejected_labels") for labels in subset[side])
    return subset, {"truncated": int(((raw > max_seq_len) & kept).sum()), "dropped": int((~kept).sum()),
                    "tokens": int(length[kept].sum()), "label_tokens": int(answers)}


def prepare_pairs(path: str, tokenizer: Any, *, max_seq_len: int, overlong: str = "truncate",
                  eval: float | int | str | None = None, seed: int = 42,
                  labels: dict[str, str] | None = None) -> Prepared:
    """Read, check, tokenize and split a preference file (no cache: pairs are tokenized at each start).

    The splits have columns ``chosen_ids``, ``chosen_labels``, ``rejected_ids``, ``rejected_labels`` and
    ``length``; ``info`` is shaped like :func:`~finetune.data.prepare.prepare`'s, with ``format`` the prompt
    format inference uses (``messages`` or ``prompt_completion``) and ``preference`` the layout read."""
    labels = labels or {}
    name = labels.get(path, path)
    spec = _eval_spec(eval)
    records, encoded = _encode(path, labels.get(path), tokenizer, max_seq_len, overlong)
    rows = np.arange(encoded.num_rows)
    eval_set, eval_counts = None, {"truncated": 0, "dropped": 0}
    here: dict[str, Any] = {"path": name}
    if spec and spec[0] == "file":
        _, eval_encoded = _encode(spec[1], labels.get(spec[1]), tokenizer, max_seq_len, overlong)
        eval_set, eval_counts = _keep(eval_encoded, np.arange(eval_encoded.num_rows), max_seq_len)
        here.update(eval_path=labels.get(spec[1], spec[1]), eval_sha256=dataset_fingerprint(spec[1]))
    elif spec:
        rows, eval_rows = _split(encoded.num_rows, spec, seed, name)
        eval_set, eval_counts = _keep(encoded, eval_rows, max_seq_len)
    train, counts = _keep(encoded, rows, max_seq_len)
    hint = f"raise max_seq_len (now {max_seq_len}): the prompts fill it and leave no answer tokens"
    if train.num_rows == 0:
        raise DataError(f"{name}: no training pairs left: all {counts['dropped']} lose their answers to truncation",
                        hint)
    if eval_set is not None and eval_set.num_rows == 0:
        raise DataError(f"{here.get('eval_path', name)}: no eval pairs left after truncation", hint)
    chat = bool(encoded[0]["chat"])  # every row alike (checked): a version trained on chats takes chats
    fmt = "messages" if chat else "prompt_completion"
    tok_sha = tokenizer_fingerprint(tokenizer)
    return Prepared(train, eval_set, {
        **here, "sha256": dataset_fingerprint(path), "rows": encoded.num_rows, "format": fmt,
        "preference": layout(records.column_names), "template": "chat_template" if chat else fmt,
        "template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest() if chat else None,
        "tokenizer_sha256": tok_sha, "max_seq_len": max_seq_len, "train_on_inputs": False,
        "train_rows": train.num_rows, "eval_rows": eval_set.num_rows if eval_set is not None else 0,
        "truncated": counts["truncated"] + eval_counts["truncated"],
        "dropped": counts["dropped"] + eval_counts["dropped"],
        "train_tokens": counts["tokens"], "label_tokens": counts["label_tokens"], "cache_hit": False,
    })


def preview_pieces(record: dict, tokenizer: Any = None) -> list[tuple[str, bool]]:
    """A pair for the data preview: the prompt, the chosen answer (marked learned), then the rejected one after a
    rule. Without a tokenizer, conversations are shown turn by turn."""
    try:
        prompt, chosen, rejected = pair_parts(record)
        if isinstance(prompt, str) or tokenizer is None:
            show = lambda v: v if isinstance(v, str) else "".join(  # noqa: E731
                f"{m['role']}: {m['content']}\n" for m in v)
            texts = (show(prompt), show(chosen), show(rejected))
        else:
            pair = render_pair(record, tokenizer)
            texts = (pair.prompt, pair.chosen, pair.rejected)
    except _Bad as bad:
        raise DataError(bad.message, bad.hint) from None
    return [(texts[0], False), (texts[1], True), ("\n── rejected ──\n", False), (texts[2], False)]
