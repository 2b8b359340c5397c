"""The training config's problems in the loader's words: pydantic validates the config's models
(:mod:`finetune.config`), and this layer turns its errors into the messages the loader has always given.

Each problem names its dotted key and where it came from (``line 7: ...`` in a file, ``--set train.lr=x: ...``
for an override); an unknown key gets a did-you-mean from the field names and the other spellings people use
(:class:`Hints`); a value of the right type that breaks a rule says the rule (``must be > 0, got 0.0``), any
other says the type expected (``expected an integer or null, got 'ten'``); all come at once, in reading order.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import AfterValidator, BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from .errors import UsageError


@dataclass(frozen=True)
class Hints:
    """What a field's rules do not say (pydantic ignores it; the loader reads it): other spellings people use
    for the key (only for did-you-mean; they are not accepted), and how a path value is resolved ("data" or
    "explicit"; see the module docstring)."""

    aliases: tuple[str, ...] = ()
    path: str | None = None


def checked(check: Callable[[Any], object]) -> AfterValidator:
    """A validator that runs ``check`` (which raises UsageError) and reports its message as the problem."""
    def run(value: Any) -> Any:
        try:
            check(value)
        except UsageError as err:
            raise PydanticCustomError("config_rule", "{problem}", {"problem": str(err)}) from None
        return value
    return AfterValidator(run)


@dataclass(frozen=True)
class Origin:
    label: str | None  # "line 7", "--set train.lr=1e-4", or None for a plain dict
    base: Path  # the folder relative paths are resolved against


def join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _section_of(info: FieldInfo) -> type[BaseModel] | None:
    """The model of a field that is a section of keys, or None."""
    tp = info.annotation
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def hints_of(info: FieldInfo) -> Hints:
    return next((m for m in info.metadata if isinstance(m, Hints)), Hints())


def _spellings(cls: type[BaseModel], prefix: str, deep: bool) -> dict[str, str]:
    """Field names and aliases of ``cls`` (and, if ``deep``, of its sections), mapped to their dotted paths."""
    found: dict[str, str] = {}
    for name, info in cls.model_fields.items():
        path = join(prefix, name)
        found.update(dict.fromkeys((name, *hints_of(info).aliases), path))
        section = _section_of(info)
        if deep and section is not None:
            found.update(_spellings(section, path, deep))
    return found


def _suggest(root: type[BaseModel], cls: type[BaseModel], prefix: str, key: str) -> str | None:
    """The dotted path the user most likely meant: an alias here, then anywhere, then a close spelling."""
    here, anywhere = _spellings(cls, prefix, False), _spellings(root, "", True)
    for table, cutoff in ((here, 1.0), (anywhere, 1.0), (here, 0.6), (anywhere, 0.8)):
        close = difflib.get_close_matches(key, list(table), n=1, cutoff=cutoff)
        if close:
            return table[close[0]]
    return None


def members(tp: Any) -> list[Any]:
    """The types a field's annotation accepts, each unwrapped from its ``Annotated``."""
    if typing.get_origin(tp) is Annotated:
        return members(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in members(arg)]
    return [tp]


_BOUND_KEYS = {annotated_types.Gt: "gt", annotated_types.Ge: "ge", annotated_types.Lt: "lt"}


def _bounds_of(tp: Any, info: FieldInfo) -> dict[str, Any]:
    """The numeric bounds a field declares (on itself or on a member of its union): ``{"gt": 0, "lt": 1}``."""
    found: dict[str, Any] = {}

    def visit(metadata: Sequence[Any]) -> None:
        for meta in metadata:
            if isinstance(meta, FieldInfo):
                visit(meta.metadata)
            key = _BOUND_KEYS.get(type(meta))
            if key is not None:
                found[key] = getattr(meta, key)

    visit(info.metadata)
    stack = [tp]
    while stack:
        node = stack.pop()
        if typing.get_origin(node) is Annotated:
            visit(node.__metadata__)
            stack.append(typing.get_args(node)[0])
        elif typing.get_origin(node) in (Union, types.UnionType):
            stack.extend(typing.get_args(node))
    return found


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
          list[str]: "a list of strings"}


def _describe(tp: Any) -> str:
    """A field's type in words: 'an integer or null', 'true or false or auto'."""
    accepts = members(tp)
    if len(accepts) == 1 and typing.get_origin(accepts[0]) is Literal:
        return "a string"  # one of named values: its own problem says which
    names = [" or ".join(typing.get_args(m)) if typing.get_origin(m) is Literal else _NAMES[m] for m in accepts]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_checked(tp: Any, value: Any) -> Any:
    """A value as the field holds it, for showing it in a problem (``0`` for a number field is ``0.0``)."""
    accepts = members(tp)
    if float in accepts and int not in accepts and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return float(value)
        except (ValueError, OverflowError):
            return value
    return value


def _bounds(gt: float | None = None, ge: float | None = None, lt: float | None = None) -> str:
    """The allowed range in words: '> 0', '>= 0', 'in (0, 1)', 'in [0, 1)'."""
    if lt is not None and (gt is not None or ge is not None):
        return f"in ({gt}, {lt})" if gt is not None else f"in [{ge}, {lt})"
    return f"> {gt}" if gt is not None else f">= {ge}" if ge is not None else f"< {lt}"


_RULES = ("greater_than", "greater_than_equal", "less_than", "config_rule", "literal_error")


def _field_problem(cls: type[BaseModel], name: str, path: str, raw: Any, errors: list[dict[str, Any]]) -> str:
    """What is wrong with field ``name`` of ``cls``, given all of pydantic's errors for it, in the loader's
    words: a broken rule when the value had a fitting type, else the type expected."""
    info = cls.model_fields[name]
    tp = info.annotation
    for error in errors:
        kind, accepts = error["type"], members(tp)
        if kind == "literal_error" and (not isinstance(raw, str) or len(accepts) > 1):
            continue  # not a string, or a union's other member: the type is what is wrong
        if kind == "config_rule":
            return f"{path}: {error['ctx']['problem']}"
        if kind == "literal_error":
            return f"{path}: must be one of {', '.join(typing.get_args(accepts[0]))}; got {show(raw)}"
        if kind in _RULES:
            return f"{path}: must be {_bounds(**_bounds_of(tp, info))}, got {show(_as_checked(tp, raw))}"
    return f"{path}: expected {_describe(tp)}, got {show(raw)}"


class Reporter:
    """Turns pydantic's errors for a raw config into the loader's problems: each names its dotted key and where
    it came from, unknown keys get a did-you-mean, and all are ordered as the file reads."""

    def __init__(self, root: type[BaseModel], origins: dict[str, Origin], default: Origin):
        self.root = root
        self.origins = origins
        self.default = default
        self.problems: list[tuple[float, int, str, str]] = []  # (line, walk order, text, dotted key)

    def origin(self, path: str) -> Origin:
        while path:  # a key set as part of a larger value belongs to that value's origin
            if path in self.origins:
                return self.origins[path]
            path = path.rpartition(".")[0]
        return self.default

    def report(self, path: str, message: str, order: int = 1 << 30) -> None:
        label = self.origin(path).label
        line = float(label[5:]) if label and label.startswith("line ") else math.inf
        self.problems.append((line, order, f"{label}: {message}" if label else message, path))

    def sorted(self) -> list[tuple[str, str]]:
        """Every problem as (dotted key, text), in the order the file reads (then the overrides)."""
        return [(path, text) for _, _, text, path in sorted(self.problems, key=lambda p: (p[0], p[1]))]

    def errors(self, raw: Mapping[str, Any], error: ValidationError) -> set[str]:
        """Report every problem in ``error``; the dotted keys found wrong."""
        by_field: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for e in error.errors():
            by_field.setdefault(self._field_loc(e["loc"]), []).append(e)
        walk = self._walk_order(self.root, raw, "")
        for loc, errors in by_field.items():
            path = ".".join(map(str, loc))
            cls, name, value = self._locate(loc, raw)
            order = walk.get(path, 1 << 29)
            if errors[0]["type"] in ("extra_forbidden", "invalid_key"):  # a key not a string: unknown too
                hint = _suggest(self.root, cls, path.rpartition(".")[0] if len(loc) > 1 else "", str(loc[-1]))
                self.report(path, f"unknown key '{path}'" + (f" (did you mean '{hint}'?)" if hint else ""), order)
            elif errors[0]["type"] == "missing":
                self.report(path, f"missing required key '{path}'", order)
            elif _section_of(cls.model_fields[name]) is not None:
                self.report(path, f"{path}: expected a mapping of keys, got {show(value)}", order)
            else:
                self.report(path, _field_problem(cls, name, path, value, errors), order)
        return {".".join(map(str, loc)) for loc in by_field}

    def _field_loc(self, loc: tuple[Any, ...]) -> tuple[Any, ...]:
        """The part of an error's location that names a config key (past it: union members, list items)."""
        cls = self.root
        for depth, part in enumerate(loc):
            info = cls.model_fields.get(part) if isinstance(part, str) else None
            section = _section_of(info) if info is not None else None
            if section is None:
                return loc[: depth + 1]
            cls = section
        return loc

    def _locate(self, loc: tuple[Any, ...], raw: Any) -> tuple[type[BaseModel], str, Any]:
        """The section class, the key, and the raw value at a field's location."""
        cls = self.root
        for part in loc[:-1]:
            cls = _section_of(cls.model_fields[part]) or cls
            raw = raw.get(part) if isinstance(raw, Mapping) else None
        return cls, str(loc[-1]), raw.get(loc[-1]) if isinstance(raw, Mapping) else None

    def _walk_order(self, cls: type[BaseModel], raw: Any, prefix: str, order: dict[str, int] | None = None
                    ) -> dict[str, int]:
        """Each dotted key's place in reading order: a section's unknown keys, then its fields as declared."""
        order = {} if order is None else order
        raw = raw if isinstance(raw, Mapping) else {}
        for key in raw:
            if key not in cls.model_fields:
                order[join(prefix, key)] = len(order)
        for name, info in cls.model_fields.items():
            order[join(prefix, name)] = len(order)
            section = _section_of(info)
            if section is not None:
                self._walk_order(section, raw.get(name), join(prefix, name), order)
        return order
