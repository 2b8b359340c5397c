"""What every command module shares: the registry a command works on, and printing tables and JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..registry import Registry


def open_registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


def printable(text: str) -> str:
    """Text from the registry (a description someone wrote) made safe for a terminal line: control characters
    (newlines, ANSI escapes) are shown escaped, never acted on."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def add_command(sub: argparse._SubParsersAction, name: str, func: Callable, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    return p

