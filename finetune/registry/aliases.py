"""A model's aliases (``aliases.json``: ``{"prod": 3, ...}``), read strictly.

The file is written by the registry, but people edit it by hand. Whatever they wrote is either understood
exactly (a number written as a string, ``"16"``, is the number 16: a deletion must see that the alias points at
version 16) or refused in one line that names the file, the entry and the way out, never half-used.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import IntegrityError


def _hint(path: Path) -> str:
    return (f"fix {path} by hand (a JSON object of alias -> version number, e.g. {{\"prod\": 3}}), "
            "or remove it to drop every alias")


def read_aliases(path: Path) -> dict[str, int]:
    """The aliases in ``path`` (``Layout.aliases_file``); an unreadable or malformed file is an
    :class:`IntegrityError` saying how to fix it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        line = getattr(err, "lineno", None)
        raise IntegrityError(f"{path} is not valid JSON{f' (line {line})' if line else ''}", _hint(path)) from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} holds a JSON {type(data).__name__}, not an object", _hint(path))
    out = {}
    for alias, number in data.items():
        if isinstance(number, str) and number.strip().isdigit():
            number = int(number)  # a hand edit's "16": meant as 16
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise IntegrityError(f"{path}: alias {alias!r} points at {json.dumps(number)}, not a version number",
                                 _hint(path))
        out[alias] = number
    return out
