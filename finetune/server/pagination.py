"""Replicate's cursor pagination: ``{"next": URL | null, "previous": URL | null, "results": [...]}``.

A cursor is an opaque token naming the key of the last item shown (for ``next``) or the first (for
``previous``), not an offset, so pages stay consistent while items are added or deleted. ``next`` and
``previous`` are absolute URLs: the official client GETs them as they are.

Callers hand over the keys of every item in display order (cheap: version numbers, model names, ids) and a
``load`` function; only the items of the page shown are loaded.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from ..errors import UsageError
from .context import base_url

K = TypeVar("K", int, str)
MAX_CURSOR_LENGTH = 1024  # ours are a few dozen characters


def encode_cursor(direction: str, key: Any) -> str:
    raw = json.dumps([direction, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _invalid(cursor: str) -> UsageError:
    return UsageError(f"invalid cursor {cursor[:40]!r}", "use the `next` or `previous` URL of a page as it is")


def decode_cursor(cursor: str, key_type: type | None = None) -> tuple[str, Any]:
    """``("after" | "before", key)``; a cursor we did not make (or one of another listing, whose keys are not
    of ``key_type``) is a 422 usage error, never a 500."""
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise _invalid(cursor)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        direction, key = json.loads(raw)
    except (ValueError, TypeError):
        raise _invalid(cursor) from None
    if direction not in ("after", "before") or type(key) not in (int, str):
        raise _invalid(cursor)
    if key_type is not None and type(key) is not key_type:
        raise _invalid(cursor)
    return direction, key


def _position(keys: Sequence[K], key: K, descending: bool) -> int:
    """Index of the first item at or after ``key`` in display order (``key`` itself may be gone)."""
    for i, k in enumerate(keys):
        if (k <= key) if descending else (k >= key):
            return i
    return len(keys)


def page_window(keys: Sequence[K], cursor: str | None, page_size: int, descending: bool) -> tuple[int, int]:
    """``(start, stop)`` of the page that ``cursor`` names within ``keys`` (sorted in display order)."""
    if not cursor:
        return 0, min(page_size, len(keys))
    direction, key = decode_cursor(cursor, type(keys[0]) if keys else None)
    at = _position(keys, key, descending)
    if direction == "after":
        start = at + 1 if at < len(keys) and keys[at] == key else at
        return start, min(start + page_size, len(keys))
    stop = at
    return max(0, stop - page_size), stop


def page(request: Request, keys: Sequence[K], load: Callable[[K], Any], *, descending: bool,
         page_size: int) -> dict[str, Any]:
    """The page the request's ``cursor`` names, as Replicate's ``{next, previous, results}``."""
    start, stop = page_window(keys, request.query_params.get("cursor"), page_size, descending)
    shown = keys[start:stop]
    url = base_url(request) + request.url.path

    def link(direction: str, key: Any) -> str:
        return f"{url}?cursor={encode_cursor(direction, key)}"

    return {
        "next": link("after", shown[-1]) if shown and stop < len(keys) else None,
        "previous": link("before", shown[0]) if shown and start > 0 else None,
        "results": [obj for obj in map(load, shown) if obj is not None],  # None: deleted meanwhile
    }
