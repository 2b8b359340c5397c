"""Reading a config file: the YAML document with the line each key was written on (so every problem can name its
line), and the ``--set KEY=VALUE`` overrides of the command line. :mod:`finetune.config` checks what comes out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from .config_check import Origin, join
from .errors import ConfigError


def _key_lines(node: yaml.Node, prefix: str, lines: dict[str, int], early: list[tuple[float, str, str]]) -> None:
    """Map each dotted key in a composed YAML tree to its 1-based line; note keys written twice."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        path, line = join(prefix, key_node.value), key_node.start_mark.line + 1
        if path in lines:
            early.append((line, f"line {line}: duplicate key '{path}' (first set at line {lines[path]})", path))
            continue
        lines[path] = line
        _key_lines(value_node, path, lines, early)


def _self_reference(node: yaml.Node, open_nodes: set[int], done: set[int] | None = None) -> yaml.Node | None:
    """The first node that contains itself (``&a [*a]``, ``&a {k: *a}``), which no config value can be. Each
    node is walked once, however many aliases share it."""
    done = set() if done is None else done
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) or id(node) in done:
        return None
    if id(node) in open_nodes:
        return node
    open_nodes.add(id(node))
    children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
    for child in children:
        found = _self_reference(child, open_nodes, done)
        if found is not None:
            return found
    open_nodes.discard(id(node))
    done.add(id(node))
    return None


def read_yaml(path: Path, source: str) -> tuple[Any, dict[str, int], list[tuple[float, str, str]]]:
    """The document in ``path`` as plain data, the 1-based line of each dotted key, and the problems found before
    any value is checked (keys written twice), as ``(line, message, key)``. Unreadable files and invalid YAML
    raise :class:`ConfigError` naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["config file not found"], source=source) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"cannot read config file: {err}"], source=source) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        early: list[tuple[float, str, str]] = []
        if node is not None:
            loop = _self_reference(node, set())
            if loop is not None:
                raise ConfigError([f"line {loop.start_mark.line + 1}: invalid YAML: the value anchored here "
                                   "(&name) contains its own alias (*name); write the value out"], source=source)
            _key_lines(node, "", lines, early)  # before construction, which rewrites merge keys in place
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError([f"{where}invalid YAML: {getattr(err, 'problem', None) or err}"], source=source) from None
    finally:
        loader.dispose()
    return raw, lines, early


def apply_override(raw: dict[str, Any], item: str, origins: dict[str, Origin],
                   early: list[tuple[float, str, str]]) -> None:
    """Apply one ``--set KEY=VALUE`` (VALUE parsed as YAML) to ``raw`` in place; its keys now come from the
    command line (``origins``). A malformed item is noted in ``early`` instead."""
    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        early.append((math.inf, f"--set {item!r}: expected KEY=VALUE with a dotted key, for example train.lr=1e-4",
                      ""))
        return
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        early.append((math.inf, f"--set {item}: cannot parse the value {text!r} as YAML", key))
        return
    section = raw
    for i, part in enumerate(parts[:-1]):
        if section.get(part) is None:
            section[part] = {}
        section = section[part]
        if not isinstance(section, dict):
            where = ".".join(parts[: i + 1])
            early.append((math.inf, f"--set {item}: '{where}' is not a section", where))
            return
    section[parts[-1]] = value
    for path in [p for p in origins if p == key or p.startswith(key + ".")]:
        del origins[path]  # the override replaced whatever the file had at and below this key
    origins[key] = Origin(f"--set {item}", Path.cwd())
