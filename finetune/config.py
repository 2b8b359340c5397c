"""The training config: pydantic models, loaded from YAML and checked in full at load.

The models below are the config's one definition: each setting is one field with its type, default and rules
(numeric bounds, accepted values as a ``Literal``, checks that raise UsageError), plus :class:`~finetune.
config_check.Hints` (other spellings people use for the key, for did-you-mean; how a path is resolved). Adding a
setting means adding one field. Pydantic validates; :mod:`finetune.config_check` reports every problem at once in
a single :class:`ConfigError`, each naming its dotted key and where it came from: ``line 7: ...`` for the file,
``--set train.lr=x: ...`` for a command-line override (``ConfigError.fields`` has them by key, for forms).
Values are as strict as the types say: ``true`` is not ``1``, ``"8"`` not ``8``; a number may be written as a
string (YAML 1.1 reads ``2e-4`` as one). The models are frozen: ``cfg.train.lr`` reads, never writes.

Relative paths are resolved like docker-compose does: against the config file's folder when written in the
file, against the current directory when given with ``--set``, and stored absolute. ``data.path`` and a file
``data.eval`` are resolved when the path exists there, starts with ``./`` or ``../``, or ends in a data-file
suffix; anything else (``tatsu-lab/alpaca``) is kept as written for the data layer, which checks existence.
``base_model`` is resolved only when written ``./...`` or ``../...``, so registry refs and hub ids keep their
meaning for :func:`finetune.sources.resolve_model`.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError, PydanticUndefined

from .choices import FORMATS, OVERLONG
from .config_check import Hints, Origin, Reporter, checked, hints_of, join, members, show
from .config_file import apply_override, read_yaml
from .errors import ConfigError, UsageError
from .names import UPLOAD_SCHEME, parse_model_name

_DATA_SUFFIXES = frozenset({".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt"})


def _non_empty(value: Any) -> None:
    if isinstance(value, (str, list)) and not value:
        raise UsageError("must not be empty")


def _not_a_number(value: str) -> None:
    """A string that reads as a number is not a file name (the number is checked as a fraction instead)."""
    try:
        number = float(value)
    except ValueError:
        return
    if math.isfinite(number):
        raise UsageError("a number here is a fraction in (0, 1), not a file")


# A number: an int does, and so does a numeric string (YAML 1.1 reads ``2e-4`` as a string); inf and nan do not,
# nor true/false (every section refuses those for a number: _Section._no_bool_for_numbers).
Number = Annotated[float, Field(strict=False, allow_inf_nan=False)]
Text = Annotated[str, checked(_non_empty)]


def _opt(default: Any = PydanticUndefined, *, gt: float | None = None, ge: float | None = None,
         lt: float | None = None, aliases: tuple[str, ...] = (), path: str | None = None,
         factory: Callable[[], Any] | None = None) -> Any:
    """A field: its default (``factory`` for a list), numeric bounds, and its :class:`Hints`."""
    info = Field(default, gt=gt, ge=ge, lt=lt) if factory is None else Field(default_factory=factory)
    info.metadata.append(Hints(aliases, path))
    return info


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


METHODS = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "hinge")
LORA_INITS = ("default", "gaussian", "pissa", "olora")
# Inits that change the base's weights: with them the base with the adapter off is no longer the base model.
BASE_CHANGING_INITS = ("pissa", "olora")


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


class _Section(BaseModel):
    # strict: no silent conversions (true is not 1, "8" not 8) except where a type says so (Number)
    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            accepts = members(cls.model_fields[info.field_name].annotation)
            if float in accepts and bool not in accepts:
                raise PydanticCustomError("config_type", "a number, not true or false")
        return value


class DataConfig(_Section):
    """Where the training rows come from and how they are cut."""

    path: Text = _opt(path="data", aliases=("train_file", "dataset", "file"))
    format: Literal[FORMATS] = _opt("auto")  # type: ignore[valid-type]
    # a fraction held out, or an eval file; a string that reads as a number is the fraction
    eval: Annotated[Number, Field(gt=0, lt=1)] | Annotated[Text, checked(_not_a_number)] | None = _opt(
        None, path="data", aliases=("eval_file", "validation", "val", "eval_split"))
    max_seq_len: int = _opt(512, gt=0, aliases=("max_length", "max_seq_length", "seq_len", "cutoff_len"))
    overlong: Literal[OVERLONG] = _opt("truncate")  # type: ignore[valid-type]


class LoraConfig(_Section):
    """The LoRA adapter's shape."""

    r: int = _opt(16, gt=0, aliases=("rank", "lora_r"))
    alpha: Number = _opt(32.0, gt=0, aliases=("lora_alpha",))
    # 0 like peft's default: dropout masks on every adapted layer's input cost a noticeable share of a CPU step
    # (BENCHMARKS.md) for little gain in short fine-tunes; set it when overfitting shows.
    dropout: Number = _opt(0.0, ge=0, lt=1, aliases=("lora_dropout",))
    target_modules: Annotated[str | list[str], checked(_non_empty)] = _opt(
        "all-linear", aliases=("modules", "targets"))
    # peft's variants: DoRA (weight-decomposed), rank-stabilised scaling (alpha / sqrt(r)), layers trained and saved
    # whole (an output head, embeddings), and how A and B start (pissa and olora move the base's principal part into
    # the adapter; the published adapter is converted back to one over the unchanged base).
    use_dora: bool = _opt(False, aliases=("dora",))
    use_rslora: bool = _opt(False, aliases=("rslora",))
    modules_to_save: Annotated[list[str], checked(_non_empty)] | None = _opt(
        None, aliases=("save_modules", "trainable_modules"))
    init: Literal[LORA_INITS] = _opt("default", aliases=("init_lora_weights", "init_weights"))  # type: ignore[valid-type]


class DpoConfig(_Section):
    """Preference training (``train.method: dpo``): Direct Preference Optimization against the starting model."""

    beta: Number = _opt(0.1, gt=0, aliases=("dpo_beta",))
    loss: Literal[DPO_LOSSES] = _opt("sigmoid", aliases=("loss_type",))  # type: ignore[valid-type]
    # An added NLL term on the chosen answers (per answer, mean over its tokens), as RPO does; 0 = plain DPO.
    sft_weight: Number = _opt(0.0, ge=0, aliases=("rpo_alpha", "nll_weight"))


class TrainConfig(_Section):
    """The optimisation loop. ``max_steps``, when set, takes precedence over ``epochs``."""

    # sft: supervised, on completions; dpo: on preference pairs (see the dpo section)
    method: Literal[METHODS] = _opt("sft", aliases=("trainer", "objective"))  # type: ignore[valid-type]
    epochs: Number = _opt(1.0, gt=0, aliases=("num_epochs", "num_train_epochs", "epoch"))
    max_steps: int | None = _opt(None, gt=0, aliases=("steps", "num_steps"))
    batch_size: int = _opt(8, gt=0, aliases=("per_device_train_batch_size", "micro_batch_size", "bs"))
    grad_accum: int = _opt(1, gt=0, aliases=("gradient_accumulation_steps", "gradient_accumulation"))
    lr: Number = _opt(2e-4, gt=0, aliases=("learning_rate",))
    scheduler: Literal["cosine", "linear", "constant"] = _opt("cosine", aliases=("lr_scheduler", "lr_scheduler_type"))
    warmup_steps: int = _opt(0, ge=0, aliases=("warmup",))
    weight_decay: Number = _opt(0.0, ge=0)
    max_grad_norm: Number | None = _opt(1.0, gt=0, aliases=("grad_clip", "clip_grad_norm"))
    seed: int = _opt(42, ge=0, lt=2**32)  # numpy takes 0 to 2**32 - 1
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _opt("auto", aliases=("dtype", "mixed_precision"))
    # auto: packed rows where the model keeps packed sequences apart (checked when it loads), else padded batches
    # and the log says why; true: packed rows or an error.
    packing: bool | Literal["auto"] = _opt("auto", aliases=("pack",))
    train_on_inputs: bool = _opt(False)
    checkpoint_every: int = _opt(0, ge=0, aliases=("save_steps", "save_every"))  # steps; 0 = only at the end
    eval_every: int = _opt(0, ge=0, aliases=("eval_steps",))  # steps; 0 = only at the end
    early_stopping_patience: int | None = _opt(None, gt=0, aliases=("patience", "early_stopping"))
    log_every: int = _opt(1, gt=0, aliases=("logging_steps", "log_steps"))
    # experiment trackers that receive the config, each logged step and the final figures (training.trackers)
    report_to: Annotated[list[str], checked(_trackers)] = _opt(factory=list,
                                                               aliases=("trackers", "log_with", "loggers"))
    # Training processes (data parallel; each window's micro-batches are split among them, so this is part of the
    # global batch). None: as many as the run is started with. `finetune serve --executor ray` starts this many
    # (a Ray Train TorchTrainer, possibly over several nodes); any other run must be started with exactly as many.
    processes: int | None = _opt(None, gt=0, aliases=("num_processes", "world_size", "nproc_per_node", "num_workers"))


def _empty_is_default(value: Any) -> Any:
    return {} if value is None else value  # "train:" with everything commented out means all defaults


Section = BeforeValidator(_empty_is_default)


class Config(_Section):
    """A complete, checked training config. Build it with :func:`load_config` or :func:`config_from_dict`."""

    base_model: Text = _opt(path="explicit", aliases=("model", "model_name", "model_name_or_path", "base"))
    destination: Annotated[str, checked(parse_model_name)] | None = _opt(
        None, aliases=("dest", "output", "output_model"))
    data: Annotated[DataConfig, Section] = Field(default_factory=dict, validate_default=True)
    lora: Annotated[LoraConfig, Section] = Field(default_factory=LoraConfig)
    train: Annotated[TrainConfig, Section] = Field(default_factory=TrainConfig)
    dpo: Annotated[DpoConfig, Section] = Field(default_factory=DpoConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data; ``config_from_dict(cfg.to_dict()) == cfg``."""
        return self.model_dump()


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


def _cross_check(reporter: Reporter, raw: Mapping[str, Any], wrong: set[str]) -> None:
    """Rules that involve more than one field (each only where the fields it reads are right)."""
    train, data = raw.get("train") or {}, raw.get("data") or {}
    if "train" in wrong or not isinstance(train, Mapping) or "data" in wrong or not isinstance(data, Mapping):
        return
    no_eval = data.get("eval") is None and "data.eval" not in wrong
    patience, every = train.get("early_stopping_patience"), train.get("eval_every")
    if no_eval and patience is not None and "train.early_stopping_patience" not in wrong:
        reporter.report("train.early_stopping_patience", "train.early_stopping_patience: needs an eval set; "
                        "set data.eval to a fraction in (0, 1) or a file")
    if no_eval and every not in (None, 0) and "train.eval_every" not in wrong:
        reporter.report("train.eval_every", "train.eval_every: needs an eval set; "
                        "set data.eval to a fraction in (0, 1) or a file, or drop eval_every")
    if train.get("method", "sft") == "sft" and data.get("format") == "preference" and not wrong & {
            "train.method", "data.format"}:
        reporter.report("data.format", "data.format: preference rows train with train.method: dpo")
    if train.get("method") == "dpo" and "train.method" not in wrong:
        lora = raw.get("lora")
        lora = lora if isinstance(lora, Mapping) else {}
        if data.get("format") not in ("auto", "preference", None) and "data.format" not in wrong:
            reporter.report("data.format", f"data.format: dpo trains on preference rows; set it to auto or "
                            f"preference, not {data['format']}")
        if lora.get("init") in BASE_CHANGING_INITS and "lora.init" not in wrong:
            reporter.report("lora.init", f"lora.init: {lora['init']} changes the base weights, so the base with "
                            "the adapter off is no longer the reference model dpo needs; use default or gaussian")


def _resolve_paths(model: Any, origin: Callable[[str], Origin], prefix: str = "") -> Any:
    """``model`` with each path field resolved against the folder of where it was written."""
    changes: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value, path, mode = getattr(model, name), join(prefix, name), hints_of(info).path
        if isinstance(value, _Section):
            changes[name] = _resolve_paths(value, origin, path)
        elif mode and isinstance(value, str):
            changes[name] = _resolve(value, origin(path).base, mode)
    return model.model_copy(update=changes)


def _build(raw: Any, origins: dict[str, Origin], default: Origin, source: str,
           early: Sequence[tuple[float, str, str]] = ()) -> Config:
    reporter = Reporter(Config, origins, default)
    reporter.problems.extend((line, -1, text, path) for line, text, path in early)
    config = None
    if not isinstance(raw, Mapping):
        got = "an empty document" if raw is None else show(raw)
        reporter.report("", f"expected a mapping of keys at the top level, got {got}")
    else:
        try:
            config = Config.model_validate(raw)
            wrong: set[str] = set()
        except ValidationError as err:
            wrong = reporter.errors(raw, err)
        _cross_check(reporter, raw, wrong)
    if reporter.problems or config is None:
        raise ConfigError(reporter.sorted(), source=source)
    resolved: Config = _resolve_paths(config, reporter.origin)
    return resolved


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>", *,
                     base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Check a plain mapping (as parsed from YAML or JSON) and build a :class:`Config`.

    Relative paths are resolved against ``base_dir`` (default: the current directory). Raises
    :class:`ConfigError` listing every problem.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return _build(d, {}, Origin(None, base), source)


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML training config, apply ``--set KEY=VALUE`` overrides, check everything, return a Config.

    ``overrides`` use dotted keys (``train.lr=1e-4``, ``lora.target_modules=[q_proj,v_proj]``); each VALUE is
    parsed as YAML. Raises :class:`ConfigError` (``source`` = the path) listing every problem at once.
    """
    source = os.fspath(path)
    config_path = Path(source)
    raw, lines, early = read_yaml(config_path, source)
    base = config_path.absolute().parent
    origins = {key: Origin(f"line {line}", base) for key, line in lines.items()}
    if raw is None and overrides:
        raw = {}  # an empty file plus --set for everything is a complete config
    if isinstance(raw, dict):
        for item in overrides:
            apply_override(raw, item, origins, early)
    return _build(raw, origins, Origin(None, base), source, early)
