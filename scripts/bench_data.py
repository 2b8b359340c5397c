"""The data sets and vocabulary sizes of ``scripts/bench_train.py``, built from one Alpaca file.

Three kinds of data, each a train split and a held-out split of JSONL records in one of finetune's formats:
  alpaca  the rows as they are (format alpaca): the prompt is a large share of every row, the loss is on the
          completion only (~40% of the tokens);
  long    the rows with the longest answers (format alpaca): the completion is most of each row's tokens;
  text    rows joined into documents (format text): continued pre-training, every token carries loss.
Every contender reads the same split files and encodes them with finetune's data layer, so they train the same
tokens under the same loss mask.

The vocabulary: one byte-level BPE tokenizer is trained on the rows (8k merges); a larger vocabulary widens the
model's embedding (and untied output layer) to that many rows, the new rows drawn from a seeded normal of the
model's init scale. The added ids never occur in the data, but every logit over them is computed, as a model
with that vocabulary computes it, and both contenders train the same widened model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

KINDS = ("alpaca", "long", "text")
FORMATS = {"alpaca": "alpaca", "long": "alpaca", "text": "text"}
VOCABS = {"8k": 8192, "32k": 32768, "128k": 131072}
TOKENIZER_VOCAB = VOCABS["8k"]  # what the BPE trainer is asked for; more than the rows' merges would not fit
LONG_SHARE = 0.1  # the long set: this share of the rows, those with the longest answers (500 of 5,000)
# Held-out rows per set: about the same tokens in each (~30K: an Alpaca row is ~150 tokens, a long one ~300, a
# document ~500), since every contender's adapter is evaluated on them in fp32, at 128K a minute or more per 10K.
HELD_OUT = {"alpaca": 200, "long": 100, "text": 50}
DOC_CHARS = 2000  # a text document: rows joined until it has this many characters (~500 tokens at 8k)


def alpaca_text(record: dict) -> str:
    """One Alpaca row as plain text, the way a document would hold it: instruction, input, answer."""
    parts = [record["instruction"], record.get("input") or "", record["output"]]
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def long_rows(records: Sequence[dict], count: int | None = None) -> list[dict]:
    """The ``count`` rows (default: :data:`LONG_SHARE` of them) with the longest answers (ties: first in the file
    first), in the file's order: that order is shuffled already, so the held-out split from its head is like the
    rest."""
    count = max(1, round(LONG_SHARE * len(records))) if count is None else count
    ranked = sorted(range(len(records)), key=lambda i: (-len(records[i]["output"]), i))[:count]
    return [records[i] for i in sorted(ranked)]


def text_documents(records: Sequence[dict], chars: int = DOC_CHARS) -> list[dict]:
    """The rows joined, in order, into documents of at least ``chars`` characters (the last may be shorter), as
    ``{"text": ...}`` records. No row is split or repeated."""
    docs, current, size = [], [], 0
    for record in records:
        piece = alpaca_text(record)
        current.append(piece)
        size += len(piece) + 2
        if size >= chars:
            docs.append({"text": "\n\n".join(current)})
            current, size = [], 0
    if current:
        docs.append({"text": "\n\n".join(current)})
    return docs


def build_records(records: Sequence[dict], kind: str) -> list[dict]:
    """The records of data set ``kind`` (see :data:`KINDS`) built from Alpaca ``records``."""
    if kind == "alpaca":
        return list(records)
    if kind == "long":
        return long_rows(records)
    if kind == "text":
        return text_documents(records)
    raise ValueError(f"unknown data kind {kind!r}; use one of {', '.join(KINDS)}")


def split(records: Sequence[dict], held_out: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the held-out rows are the first ``held_out`` (at most a fifth of the set)."""
    n = min(held_out, len(records) // 5)
    return list(records[n:]), list(records[:n])


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def widen_vocabulary(model_dir: Path, size: int, seed: int) -> None:
    """Give the saved model in ``model_dir`` ``size`` embedding rows (and output rows, tied or not), the added
    ones drawn from a normal of the config's ``initializer_range`` under ``seed``; saved in place. A model that
    has ``size`` rows already is left as it is."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    if old == size:
        return
    if old > size:
        raise ValueError(f"{model_dir} has {old} embedding rows, more than the {size} asked for")
    model.resize_token_embeddings(size, mean_resizing=False)
    std = getattr(model.config, "initializer_range", 0.02)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layers = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}
        for weight in sorted(layers, key=lambda w: w.data_ptr()):
            weight[old:].normal_(0.0, std, generator=generator)
    model.config.vocab_size = size
    model.save_pretrained(model_dir)


def loss_share(dataset: Any) -> float:
    """The share of a tokenized data set's tokens that carry loss (``labels`` not -100)."""
    tokens = labelled = 0
    for labels in dataset["labels"]:
        tokens += len(labels)
        labelled += sum(1 for x in labels if x != -100)
    return labelled / max(tokens, 1)

