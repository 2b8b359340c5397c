"""The training config: typed dataclasses, loaded from YAML and checked in full at load.

Defaults live only in the dataclass fields below; the rules for each field (ranges, accepted values, hints for
misspellings) sit next to it in ``field(metadata=...)``. One generic walker reads any section, so adding a
setting means adding one field. Every problem found is reported at once in a single :class:`ConfigError`,
each naming its dotted key and where it came from: ``line 7: ...`` for the file, ``--set train.lr=x: ...``
for a command-line override.

Relative paths are resolved like docker-compose does: against the config file's folder when written in the
file, against the current directory when given with ``--set``, and stored absolute. ``data.path`` and a file
``data.eval`` are resolved when the path exists there, starts with ``./`` or ``../``, or ends in a data-file
suffix; anything else (``tatsu-lab/alpaca``) is kept as written for the data layer, which checks existence.
``base_model`` is resolved only when written ``./...`` or ``../...``, so registry refs and hub ids keep their
meaning for :func:`finetune.sources.resolve_model`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .choices import FORMATS, OVERLONG
from .errors import ConfigError, UsageError
from .names import UPLOAD_SCHEME, parse_model_name

_DATA_SUFFIXES = frozenset({".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt"})
_INVALID = object()  # stands for a value already reported, so later checks skip it instead of piling on


def _non_empty(value: Any) -> None:
    if isinstance(value, (str, list)) and not value:
        raise UsageError("must not be empty")


def _opt(default: Any = MISSING, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
         choices: tuple[str, ...] = (), path: str | None = None, check: Callable[[Any], object] | None = None,
         aliases: tuple[str, ...] = (), factory: Callable[[], Any] | None = None) -> Any:
    """A field with its rules: numeric bounds, accepted values, path resolution ("data" or "explicit"; see the
    module docstring), a check that raises UsageError, and other spellings people use for the key (only for
    did-you-mean; they are not accepted). ``factory`` makes a mutable default (a list)."""
    rules = {"gt": gt, "ge": ge, "lt": lt, "choices": choices, "path": path, "check": check, "aliases": aliases}
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


# Experiment trackers (train.report_to; finetune.training.trackers sends to them): the modules each needs, and
# the package that brings them. MLflow's local store, used without MLFLOW_TRACKING_URI, is a SQLite database.
TRACKERS = ("tensorboard", "mlflow", "wandb")
_TRACKER_NEEDS = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow",), "wandb": ("wandb",)}
_MLFLOW_LOCAL_NEEDS = ("mlflow", "sqlalchemy", "alembic")


def tracker_package_missing(name: str) -> bool:
    """Whether tracker ``name`` lacks a module here (then ``pip install NAME`` brings it)."""
    needs: tuple[str, ...] = _TRACKER_NEEDS[name]
    if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        needs = _MLFLOW_LOCAL_NEEDS
    return any(importlib.util.find_spec(module) is None for module in needs)


def _trackers(value: list[str]) -> None:
    for name in value:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UsageError(f"unknown tracker {name!r}{hint}; use any of {', '.join(TRACKERS)}")
        if tracker_package_missing(name):
            raise UsageError(f"reporting to {name} needs the {name} package: pip install {name}")
    if len(set(value)) < len(value):
        raise UsageError("names a tracker twice")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training rows come from and how they are cut."""

    path: str = _opt(path="data", check=_non_empty, aliases=("train_file", "dataset", "file"))
    format: str = _opt("auto", choices=FORMATS)
    eval: float | str | None = _opt(None, gt=0, lt=1, path="data", check=_non_empty,
                                    aliases=("eval_file", "validation", "val", "eval_split"))
    max_seq_len: int = _opt(512, gt=0, aliases=("max_length", "max_seq_length", "seq_len", "cutoff_len"))
    overlong: str = _opt("truncate", choices=OVERLONG)


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """The LoRA adapter's shape."""

    r: int = _opt(16, gt=0, aliases=("rank", "lora_r"))
    alpha: float = _opt(32.0, gt=0, aliases=("lora_alpha",))
    # 0 like peft's default: dropout masks on every adapted layer's input cost a noticeable share of a CPU step
    # (BENCHMARKS.md) for little gain in short fine-tunes; set it when overfitting shows.
    dropout: float = _opt(0.0, ge=0, lt=1, aliases=("lora_dropout",))
    target_modules: str | list[str] = _opt("all-linear", check=_non_empty, aliases=("modules", "targets"))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation loop. ``max_steps``, when set, takes precedence over ``epochs``."""

    epochs: float = _opt(1.0, gt=0, aliases=("num_epochs", "num_train_epochs", "epoch"))
    max_steps: int | None = _opt(None, gt=0, aliases=("steps", "num_steps"))
    batch_size: int = _opt(8, gt=0, aliases=("per_device_train_batch_size", "micro_batch_size", "bs"))
    grad_accum: int = _opt(1, gt=0, aliases=("gradient_accumulation_steps", "gradient_accumulation"))
    lr: float = _opt(2e-4, gt=0, aliases=("learning_rate",))
    scheduler: str = _opt("cosine", choices=("cosine", "linear", "constant"),
                          aliases=("lr_scheduler", "lr_scheduler_type"))
    warmup_steps: int = _opt(0, ge=0, aliases=("warmup",))
    weight_decay: float = _opt(0.0, ge=0)
    max_grad_norm: float | None = _opt(1.0, gt=0, aliases=("grad_clip", "clip_grad_norm"))
    seed: int = _opt(42, ge=0, lt=2**32)  # numpy takes 0 to 2**32 - 1
    precision: str = _opt("auto", choices=("auto", "bf16", "fp16", "fp32"), aliases=("dtype", "mixed_precision"))
    # auto: packed rows where the model keeps packed sequences apart (checked when it loads), else padded batches
    # and the log says why; true: packed rows or an error.
    packing: bool | Literal["auto"] = _opt("auto", aliases=("pack",))
    train_on_inputs: bool = _opt(False)
    checkpoint_every: int = _opt(0, ge=0, aliases=("save_steps", "save_every"))  # steps; 0 = only at the end
    eval_every: int = _opt(0, ge=0, aliases=("eval_steps",))  # steps; 0 = only at the end
    early_stopping_patience: int | None = _opt(None, gt=0, aliases=("patience", "early_stopping"))
    log_every: int = _opt(1, gt=0, aliases=("logging_steps", "log_steps"))
    # experiment trackers that receive the config, each logged step and the final figures (training.trackers)
    report_to: list[str] = _opt(factory=list, check=_trackers, aliases=("trackers", "log_with", "loggers"))
    # Training processes (data parallel; each window's micro-batches are split among them, so this is part of the
    # global batch). None: as many as the run is started with. `finetune serve --executor ray` starts this many
    # (a Ray Train TorchTrainer, possibly over several nodes); any other run must be started with exactly as many.
    processes: int | None = _opt(None, gt=0, aliases=("num_processes", "world_size", "nproc_per_node", "num_workers"))


@dataclass(frozen=True, kw_only=True)
class Config:
    """A complete, checked training config. Build it with :func:`load_config` or :func:`config_from_dict`."""

    base_model: str = _opt(path="explicit", check=_non_empty,
                           aliases=("model", "model_name", "model_name_or_path", "base"))
    destination: str | None = _opt(None, check=parse_model_name, aliases=("dest", "output", "output_model"))
    data: DataConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data; ``config_from_dict(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Origin:
    label: str | None  # "line 7", "--set train.lr=1e-4", or None for a plain dict
    base: Path  # the folder relative paths are resolved against


class _Mismatch(Exception):
    """A value does not have the field's type (internal; becomes a reported problem)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _spellings(cls: type, prefix: str, deep: bool) -> dict[str, str]:
    """Field names and aliases of ``cls`` (and, if ``deep``, of its sections), mapped to their dotted paths."""
    found: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        path, tp = _join(prefix, f.name), _hints(cls)[f.name]
        found.update(dict.fromkeys((f.name, *f.metadata.get("aliases", ())), path))
        if deep and isinstance(tp, type) and dataclasses.is_dataclass(tp):
            found.update(_spellings(tp, path, deep))
    return found


def _suggest(cls: type, prefix: str, key: str) -> str | None:
    """The dotted path the user most likely meant: an alias here, then anywhere, then a close spelling."""
    here, anywhere = _spellings(cls, prefix, False), _spellings(Config, "", True)
    for table, cutoff in ((here, 1.0), (anywhere, 1.0), (here, 0.6), (anywhere, 0.8)):
        close = difflib.get_close_matches(key, list(table), n=1, cutoff=cutoff)
        if close:
            return table[close[0]]
    return None


_SCALARS: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
          list[str]: "a list of strings"}


def _coerce(tp: Any, raw: Any) -> Any:
    """``raw`` converted to type ``tp``, or raise _Mismatch. Strict about bool vs int; lenient about numeric
    strings for floats, because YAML 1.1 reads ``2e-4`` as a string."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        for arg in args:  # the first member that fits wins, so declare float before str
            try:
                return _coerce(arg, raw)
            except _Mismatch:
                pass
        raise _Mismatch
    if typing.get_origin(tp) is Literal:
        if isinstance(raw, str) and raw in typing.get_args(tp):
            return raw
        raise _Mismatch
    if typing.get_origin(tp) is list:
        if not isinstance(raw, list):
            raise _Mismatch
        return [_coerce(args[0], item) for item in raw]
    assert tp in _SCALARS or tp is type(None), f"config field type {tp!r} has no conversion"
    if tp is float and isinstance(raw, str):
        try:
            raw = float(raw)
        except ValueError:
            raise _Mismatch from None
    if tp is type(None) or isinstance(raw, bool) != (tp is bool) or not isinstance(raw, _SCALARS[tp]):
        raise _Mismatch
    if tp is float and not math.isfinite(raw):  # type: ignore[arg-type]  # an int or a float here
        raise _Mismatch
    return tp(raw)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        names = [_describe(arg) for arg in typing.get_args(tp)]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if typing.get_origin(tp) is Literal:
        return " or ".join(typing.get_args(tp))
    return _NAMES[tp]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounds(gt: float | None, ge: float | None, lt: float | None) -> str:
    """The allowed range in words: '> 0', '>= 0', 'in (0, 1)', 'in [0, 1)'."""
    if lt is not None and (gt is not None or ge is not None):
        return f"in ({gt}, {lt})" if gt is not None else f"in [{ge}, {lt})"
    return f"> {gt}" if gt is not None else f">= {ge}" if ge is not None else f"< {lt}"


def _rule_problem(rules: Mapping[str, Any], value: Any) -> str | None:
    """What is wrong with a correctly typed value, per the field's declared rules, or None."""
    gt, ge, lt = rules["gt"], rules["ge"], rules["lt"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (gt is not None and not value > gt) or (ge is not None and not value >= ge) or \
                (lt is not None and not value < lt):
            return f"must be {_bounds(gt, ge, lt)}, got {_show(value)}"
    if rules["choices"] and value not in rules["choices"]:
        return f"must be one of {', '.join(rules['choices'])}; got {_show(value)}"
    if rules["check"] is not None:
        try:
            rules["check"](value)
        except UsageError as err:
            return str(err)
    return None


def _resolve(value: str, base: Path, mode: str) -> str:
    if value.startswith(UPLOAD_SCHEME):
        return value  # an uploaded file of the service, resolved by the registry when the training runs
    explicit = value.startswith(("./", "../", "~")) or value in (".", "..")
    if mode == "explicit" and not explicit:
        return value
    path = Path(value).expanduser()
    candidate = path if path.is_absolute() else base / path
    if explicit or path.is_absolute() or candidate.exists() or path.suffix.lower() in _DATA_SUFFIXES:
        return os.path.normpath(candidate.absolute())
    return value


class _Checker:
    """Walks raw data against the dataclasses, converting values and collecting every problem found."""

    def __init__(self, origins: dict[str, _Origin], default: _Origin):
        self.origins = origins
        self.default = default
        self.problems: list[tuple[float, str]] = []  # (line, text); file problems sort by line

    def origin(self, path: str) -> _Origin:
        while path:  # a key set as part of a larger value belongs to that value's origin
            if path in self.origins:
                return self.origins[path]
            path = path.rpartition(".")[0]
        return self.default

    def report(self, path: str, message: str) -> None:
        label = self.origin(path).label
        line = float(label[5:]) if label and label.startswith("line ") else math.inf
        self.problems.append((line, f"{label}: {message}" if label else message))

    def section(self, cls: type, raw: Any, prefix: str) -> dict[str, Any] | None:
        if raw is None:  # an empty section ("train:" with everything commented out) means all defaults
            raw = {}
        if not isinstance(raw, Mapping):
            self.report(prefix, f"{prefix}: expected a mapping of keys, got {_show(raw)}")
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                hint = _suggest(cls, prefix, str(key))
                self.report(_join(prefix, key), f"unknown key '{_join(prefix, key)}'"
                            + (f" (did you mean '{hint}'?)" if hint else ""))
        values: dict[str, Any] = {}
        for name, f in fields.items():
            path, tp = _join(prefix, name), _hints(cls)[name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                values[name] = self.section(tp, raw.get(name), path)
            elif name in raw:
                values[name] = self.value(f, tp, raw[name], path)
            elif f.default is MISSING and f.default_factory is MISSING:
                self.report(path, f"missing required key '{path}'")
        return values

    def value(self, f: dataclasses.Field[Any], tp: Any, raw: Any, path: str) -> Any:
        try:
            value = _coerce(tp, raw)
        except _Mismatch:
            self.report(path, f"{path}: expected {_describe(tp)}, got {_show(raw)}")
            return _INVALID
        if value is None:  # null is allowed only where the type says so, and means "unset": no rules apply
            return None
        problem = _rule_problem(f.metadata, value)
        if problem:
            self.report(path, f"{path}: {problem}")
            return _INVALID
        if f.metadata["path"] and isinstance(value, str):
            value = _resolve(value, self.origin(path).base, f.metadata["path"])
        return value

    def cross_check(self, values: dict[str, Any]) -> None:
        """Rules that involve more than one field."""
        train, data = values["train"] or {}, values["data"] or {"eval": _INVALID}
        if train.get("early_stopping_patience") not in (None, _INVALID) and data.get("eval") is None:
            self.report("train.early_stopping_patience", "train.early_stopping_patience: needs an eval set; "
                        "set data.eval to a fraction in (0, 1) or a file")
        if train.get("eval_every") not in (None, 0, _INVALID) and data.get("eval") is None:
            self.report("train.eval_every", "train.eval_every: needs an eval set; "
                        "set data.eval to a fraction in (0, 1) or a file, or drop eval_every")


def _instantiate(cls: type, values: dict[str, Any]) -> Any:
    hints = _hints(cls)
    return cls(**{k: _instantiate(hints[k], v) if dataclasses.is_dataclass(hints[k]) else v
                  for k, v in values.items()})


def _build(raw: Any, origins: dict[str, _Origin], default: _Origin, source: str,
           early: Sequence[tuple[float, str]] = ()) -> Config:
    checker = _Checker(origins, default)
    checker.problems.extend(early)
    values: dict[str, Any] | None = None
    if not isinstance(raw, Mapping):
        got = "an empty document" if raw is None else _show(raw)
        checker.report("", f"expected a mapping of keys at the top level, got {got}")
    else:
        values = checker.section(Config, raw, "")
        checker.cross_check(values or {})
    if checker.problems or values is None:
        raise ConfigError([text for _, text in sorted(checker.problems, key=lambda p: p[0])], source=source)
    config: Config = _instantiate(Config, values)
    return config


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>", *,
                     base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Check a plain mapping (as parsed from YAML or JSON) and build a :class:`Config`.

    Relative paths are resolved against ``base_dir`` (default: the current directory). Raises
    :class:`ConfigError` listing every problem.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return _build(d, {}, _Origin(None, base), source)


def _key_lines(node: yaml.Node, prefix: str, lines: dict[str, int], early: list[tuple[float, str]]) -> None:
    """Map each dotted key in a composed YAML tree to its 1-based line; note keys written twice."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        path, line = _join(prefix, key_node.value), key_node.start_mark.line + 1
        if path in lines:
            early.append((line, f"line {line}: duplicate key '{path}' (first set at line {lines[path]})"))
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


def _read_yaml(path: Path, source: str) -> tuple[Any, dict[str, int], list[tuple[float, str]]]:
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
        early: list[tuple[float, str]] = []
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


def _apply_override(raw: dict[str, Any], item: str, origins: dict[str, _Origin],
                    early: list[tuple[float, str]]) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        early.append((math.inf, f"--set {item!r}: expected KEY=VALUE with a dotted key, for example train.lr=1e-4"))
        return
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        early.append((math.inf, f"--set {item}: cannot parse the value {text!r} as YAML"))
        return
    section = raw
    for i, part in enumerate(parts[:-1]):
        if section.get(part) is None:
            section[part] = {}
        section = section[part]
        if not isinstance(section, dict):
            where = ".".join(parts[: i + 1])
            early.append((math.inf, f"--set {item}: '{where}' is not a section"))
            return
    section[parts[-1]] = value
    for path in [p for p in origins if p == key or p.startswith(key + ".")]:
        del origins[path]  # the override replaced whatever the file had at and below this key
    origins[key] = _Origin(f"--set {item}", Path.cwd())


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML training config, apply ``--set KEY=VALUE`` overrides, check everything, return a Config.

    ``overrides`` use dotted keys (``train.lr=1e-4``, ``lora.target_modules=[q_proj,v_proj]``); each VALUE is
    parsed as YAML. Raises :class:`ConfigError` (``source`` = the path) listing every problem at once.
    """
    source = os.fspath(path)
    config_path = Path(source)
    raw, lines, early = _read_yaml(config_path, source)
    base = config_path.absolute().parent
    origins = {key: _Origin(f"line {line}", base) for key, line in lines.items()}
    if raw is None and overrides:
        raw = {}  # an empty file plus --set for everything is a complete config
    if isinstance(raw, dict):
        for item in overrides:
            _apply_override(raw, item, origins, early)
    return _build(raw, origins, _Origin(None, base), source, early)
