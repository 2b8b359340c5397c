"""Turning generated token ids into streamed text pieces, and stopping at stop sequences.

Byte-level BPE tokens do not map one-to-one to characters: one character (an emoji, a CJK glyph) may span
several tokens, and a token decoded alone may lose the leading space its neighbour context gives it. So pieces
are found by decoding a small window of ids twice, with and without the newest ones, and emitting the
difference only once it no longer ends in an incomplete character (U+FFFD) — the offsets technique used by
text-generation servers. The pieces joined are the tokenizer's decode of all the ids.

Stop sequences are matched on text, not ids (a stop string may be split across tokens in any way). Text that
could still become the start of a stop sequence is held back until it cannot; the stop sequence itself is
never emitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_INCOMPLETE = "\ufffd"


class Detokenizer:
    """Incremental decoding of one sequence of generated ids (without the prompt)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] is context already emitted, decoded again for its spacing
        self._read = 0
        self.text = ""  # everything emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Append one id; return the new text it completes (often "", for a partial character)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            piece = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """At the end: whatever the full decode holds beyond what was emitted (e.g. a genuinely invalid byte)."""
        full = self._decode(self.ids)
        if full.startswith(self.text) and len(full) > len(self.text):
            piece = full[len(self.text):]
            self.text = full
            return piece
        return ""


class StopMatcher:
    """Holds back text that may begin a stop sequence; reports when one is complete."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add generated text; return what is safe to emit now. After a stop, returns the text before it."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = 0
        for stop in self.stops:  # the longest tail of pending that is a proper prefix of some stop sequence
            for k in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:k]):
                    hold = k
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def finish(self) -> str:
        """At the end of generation: held-back text that turned out not to be a stop sequence."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
