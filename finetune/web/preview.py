"""A data file as training will see it: the detected format, the row count, and the first rows rendered into
prompt text with the learned part marked (the Train tab's preview).

Everything here goes through the data layer (``read_records``, ``detect_format``, ``record_segments``), so the
preview shows what training renders, not an approximation of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FinetuneError

PREVIEW_ROWS = 3
PIECE_LIMIT = 600  # characters of one piece shown; the rest is elided (a preview, not the data)


@dataclass
class Preview:
    """What the Train tab shows under the data picker."""

    format: str | None = None  # the detected (or requested) format
    rows: int = 0
    columns: list[str] = field(default_factory=list)
    examples: list[list[tuple[str, bool]]] = field(default_factory=list)  # per row: (text, learned) pieces
    error: str | None = None  # why the file cannot be trained on, as the data layer says it
    note: str | None = None  # something worth knowing that is not an error


def _clip(text: str) -> str:
    return text if len(text) <= PIECE_LIMIT else text[:PIECE_LIMIT] + " …"


def preview_data(path: str, fmt: str = "auto", tokenizer: Any = None, limit: int = PREVIEW_ROWS,
                 label: str | None = None) -> Preview:
    """Read ``path`` and render its first ``limit`` rows; problems come back in ``Preview.error``, not raised,
    naming the file as ``label`` (an upload by its own name) when given.

    ``tokenizer`` renders ``messages`` data with its chat template; without one, such rows are shown as
    role-labelled turns (the note says so).
    """
    from ..data.formats import detect_format, record_segments
    from ..data.records import read_records

    out = Preview()
    try:
        records = read_records(path, label)
        out.rows, out.columns = records.num_rows, list(records.column_names)
        out.format = detect_format(out.columns) if fmt == "auto" else fmt
        for i, record in enumerate(records.select(range(min(limit, out.rows))).to_list(), 1):
            record = {k: v for k, v in record.items() if v is not None}
            if out.format == "messages" and tokenizer is None:
                out.examples.append(_plain_turns(record))
                out.note = "conversations are shown turn by turn; training renders them with the model's chat template"
                continue
            try:
                pieces = record_segments(record, out.format, tokenizer)
            except FinetuneError as err:
                out.error = f"row {i}: {err}"
                break
            out.examples.append([(_clip(text), learned) for text, learned in pieces if text])
        if out.format == "preference":
            out.note = ("preference pairs (train with train.method: dpo): the highlighted answer is the chosen one, "
                        "the rejected one follows the line")
    except FinetuneError as err:
        out.error = str(err)
    return out


def _plain_turns(record: dict) -> list[tuple[str, bool]]:
    turns = record.get("messages") or record.get("conversations") or []
    pieces = []
    for turn in turns if isinstance(turns, list) else []:
        if isinstance(turn, dict):
            role = str(turn.get("role") or turn.get("from") or "?")
            content = str(turn.get("content") or turn.get("value") or "")
            pieces.append((_clip(f"{role}: {content}\n"), role in ("assistant", "gpt")))
    return pieces
