"""The Train tab's form: its fields and defaults (read from the config models), turning a submitted form
into a training config, and the config loader's problems placed next to the fields they name (each problem comes
with its dotted key: :attr:`finetune.errors.ConfigError.fields`).

The form is a view of :class:`finetune.config.Config`: each common setting is one dotted key, its default is the
model field's default, and the submitted values go through :func:`finetune.config.config_from_dict`, the
same checker as a YAML file, so the messages are the loader's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import yaml

from ..config import Config, DataConfig, DpoConfig, LoraConfig, TrainConfig, config_from_dict
from ..errors import ConfigError, FinetuneError

# (dotted key, label, hint): the settings shown as fields; everything else goes in the advanced YAML box.
SETTINGS = (
    ("train.max_steps", "Steps", "optimizer steps; leave empty to train by epochs"),
    ("train.epochs", "Epochs", "passes over the data (used when steps is empty)"),
    ("train.lr", "Learning rate", "peak learning rate"),
    ("train.batch_size", "Batch size", "sequences per step"),
    ("lora.r", "LoRA rank (r)", "adapter rank"),
    ("data.max_seq_len", "Max length", "tokens per sequence; longer rows are truncated"),
    ("data.eval", "Eval split", "a fraction in (0, 1) held out for eval loss; empty for none"),
)
_SECTIONS = {"data": DataConfig, "lora": LoraConfig, "train": TrainConfig, "dpo": DpoConfig}
FIELD_KEYS = tuple(key for key, _, _ in SETTINGS) + ("data.format", "base_model", "data.path")


def default_of(key: str) -> Any:
    """The default of a dotted config key (``train.lr`` -> 0.0002)."""
    section, _, name = key.partition(".")
    field = _SECTIONS[section].model_fields[name]  # KeyError: not a key of this config
    return None if field.is_required() else field.get_default(call_default_factory=True)


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if abs(value) >= 1e-3 or value == 0 else f"{value:g}"
    return str(value)


def default_form() -> dict[str, str]:
    """The form's initial values: every common setting at its default."""
    form = {key: _show(default_of(key)) for key, _, _ in SETTINGS}
    form["data.format"] = str(default_of("data.format"))
    form["advanced"] = ""
    return form


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differs(key: str, value: Any) -> bool:
    section = key.partition(".")[0]
    if section not in _SECTIONS:
        return True  # a section this form does not know (a newer config's): kept as it was
    try:
        return default_of(key) != value
    except KeyError:  # a key of a newer config
        return True


def changed_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config's (``Config.to_dict()``) settings that are not the defaults and have no field of their
    own in the form, by dotted key (what the advanced box holds to train again with the same settings)."""
    skip = set(FIELD_KEYS) | {"destination", "data.format"}
    return {k: v for k, v in _flat(config).items() if k not in skip and _differs(k, v)}


def form_from_config(config: Mapping[str, Any], data_upload: str = "") -> dict[str, str]:
    """The form that trains again with a resolved config's settings (a training record's ``input``): the
    fields from their keys, everything else that differs from the defaults as YAML in the advanced box."""
    flat = _flat(config)
    form = {key: _show(flat.get(key)) for key, _, _ in SETTINGS}
    form["data.format"] = str(flat.get("data.format") or default_of("data.format"))
    tree: dict[str, Any] = {}
    for key, value in changed_settings(config).items():
        _set(tree, key, value)
    if isinstance(flat.get("data.eval"), str):  # an eval file: the field takes a fraction only
        form["data.eval"] = ""
        _set(tree, "data.eval", flat["data.eval"])
    form["advanced"] = yaml.safe_dump(tree, sort_keys=False, default_flow_style=False) if tree else ""
    form["base_model"] = str(config.get("base_model") or "")
    form["data_upload"] = data_upload
    return form


def _parse_scalar(text: str) -> Any:
    """A field's text as YAML reads it (``1e-4`` and ``0.1`` numbers, ``abc`` a string the checker rejects)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class FormErrors(dict):
    """Problems by field key (``train.lr``, ``advanced``, ``_form``), each a list of messages."""

    def add(self, key: str, message: str) -> None:
        self.setdefault(key, []).append(message)


def form_input(form: Mapping[str, str], data: str | None) -> tuple[dict[str, Any], FormErrors]:
    """The training input a submitted form stands for: the config's sections (``data``, ``lora``, ``train``)
    as the API's ``input`` takes them, the advanced YAML merged over the fields; ``data`` names the data file
    (an uploaded file's id). Errors here are the form's own (YAML that does not parse, a missing file)."""
    errors = FormErrors()
    raw: dict[str, Any] = {"data": {}}
    if data:
        raw["data"]["path"] = data
    fmt = (form.get("data.format") or "").strip()
    if fmt:
        raw["data"]["format"] = fmt
    for key, _, _ in SETTINGS:
        text = (form.get(key) or "").strip()
        if text:
            value = _parse_scalar(text)
            if key == "data.eval" and not isinstance(value, (int, float)):
                # the loader takes a string here as an eval *file*; this field is the fraction
                errors.add(key, f"data.eval: expected a fraction in (0, 1), got {text!r} (name an eval file in "
                           "the advanced box: data: eval: PATH)")
                continue
            _set(raw, key, value)
    advanced = form.get("advanced") or ""
    if advanced.strip():
        try:
            extra = yaml.safe_load(advanced)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            errors.add("advanced", f"{where}invalid YAML: {getattr(err, 'problem', None) or err}")
            return raw, errors
        if not isinstance(extra, Mapping):
            errors.add("advanced", "expected a mapping of keys (for example `train:` then `  warmup_steps: 5`)")
            return raw, errors
        for key in ("base_model", "destination"):
            if key in extra:
                errors.add("advanced", f"{key}: set it with the form (the trainer, and this model), not here")
        _merge(raw, {k: v for k, v in extra.items() if k not in ("base_model", "destination")})
    if not (isinstance(raw.get("data"), Mapping) and raw["data"].get("path")):
        errors.add("data.path", "choose a data file: upload one or pick an uploaded one")
    return raw, errors


def check_input(raw: dict[str, Any], errors: FormErrors, check: Callable[[dict[str, Any]], Config]) -> Config | None:
    """Run ``check`` (the config loader, as the API calls it) over ``raw``; its problems go next to the fields
    they name (the errors' ``fields``). The config, or None when anything (the form's own errors included) is
    wrong."""
    try:
        config = check(raw)
    except ConfigError as err:
        said_path = "data.path" in errors
        for problem in err.fields:
            if said_path and problem["field"] == "data.path":
                continue  # already said, in the form's words
            place_problem(errors, problem["field"], problem["message"])
        return None
    except FinetuneError as err:  # the data file cannot be used (not found, not the user's)
        fields = getattr(err, "fields", None) or [{"field": "data.path", "message": str(err)}]
        for problem in fields:
            place_problem(errors, problem["field"], problem["message"])
        return None
    return None if errors else config


def build_config(form: Mapping[str, str], *, base_model: str, data_path: str | None,
                 destination: str) -> tuple[Config | None, FormErrors]:
    """The form checked by :func:`finetune.config.config_from_dict` (for callers without a server)."""
    raw, errors = form_input(form, data_path)
    check = lambda r: config_from_dict({"base_model": base_model, "destination": destination, **r},  # noqa: E731
                                       source="the form")
    return check_input(raw, errors, check), errors


def place_problem(errors: FormErrors, field: str, message: str) -> None:
    """Put one problem next to the field it is about (a dotted key: ``train.lr``); keys without a field of their
    own (set in the advanced box) go to the advanced box, problems of no key above the form."""
    if field in FIELD_KEYS:
        errors.add(field, message)
    elif field:
        errors.add("advanced", message)
    else:
        errors.add("_form", message)
