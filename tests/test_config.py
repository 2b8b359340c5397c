"""Tests for finetune.config: defaults, overrides, round-trip, every kind of problem, path resolution."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from finetune.config import Config, DataConfig, LoraConfig, TrainConfig, config_from_dict, load_config
from finetune.errors import ConfigError, UsageError

MINIMAL = """\
base_model: local/tiny:1
data:
  path: rows.jsonl
"""


def write(tmp_path: Path, text: str, name: str = "train.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    assert info.value.source == str(path)
    return info.value.problems


# --- defaults and types -------------------------------------------------------------------------------------


def test_minimal_config_gets_every_documented_default(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.base_model == "local/tiny:1"
    assert cfg.destination is None
    assert cfg.data == DataConfig(path=str(tmp_path / "rows.jsonl"), format="auto", eval=None, max_seq_len=512,
                                  overlong="truncate")
    assert cfg.lora == LoraConfig(r=16, alpha=32.0, dropout=0.0, target_modules="all-linear")
    assert cfg.train == TrainConfig(
        epochs=1.0, max_steps=None, batch_size=8, grad_accum=1, lr=2e-4, scheduler="cosine", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, seed=42, precision="auto", packing="auto", train_on_inputs=False,
        checkpoint_every=0, eval_every=0, early_stopping_patience=None, log_every=1,
    )


def test_yaml_1_1_exponent_strings_and_ints_become_floats(tmp_path):
    # YAML 1.1 reads 2e-4 (no dot) as a string; a float field must still take it.
    cfg = load_config(write(tmp_path, MINIMAL + "train:\n  lr: 3e-5\n  epochs: 2\nlora:\n  alpha: 16\n"))
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)
    # data.eval is a fraction or a file: a string that reads as a number is the fraction, in range or refused
    for written, fraction in (("'0.1'", 0.1), ("1e-1", 0.1), ("0.25", 0.25)):
        assert load_config(write(tmp_path, MINIMAL + f"  eval: {written}\n")).data.eval == fraction
    assert problems_of(write(tmp_path, MINIMAL + "  eval: '1.5'\n")) == [
        "line 4: data.eval: must be in (0, 1), got 1.5"]


def test_empty_sections_mean_defaults_and_nulls_reach_optional_fields(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "lora:\ntrain:\n  max_grad_norm: null\n"))
    assert cfg.lora == LoraConfig()
    assert cfg.train.max_grad_norm is None


def test_null_unsets_optional_fields_without_tripping_their_rules(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "destination: null\n  # comment\ntrain:\n  max_steps: null\n"))
    assert cfg.destination is None and cfg.train.max_steps is None


def test_yaml_merge_keys_work_and_are_not_duplicates(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "train:\n  <<: {lr: 1e-3, seed: 7}\n  lr: 2e-3\n"))
    assert (cfg.train.lr, cfg.train.seed) == (2e-3, 7)


def test_config_is_immutable(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ValidationError, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]


# --- overrides ----------------------------------------------------------------------------------------------


def test_overrides_parse_values_as_yaml_and_win_over_the_file(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  lr: 1e-3\n  packing: true\n")
    cfg = load_config(path, ["train.lr=1e-4", "lora.target_modules=[q_proj,v_proj]", "train.packing=false",
                             "destination=alice/chat", "train.max_steps=25", "data.eval=0.2"])
    assert cfg.train.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.packing is False
    assert cfg.destination == "alice/chat"
    assert cfg.train.max_steps == 25
    assert cfg.data.eval == 0.2


@pytest.mark.parametrize("written,value", [("true", True), ("false", False), ("auto", "auto")])
def test_packing_is_true_false_or_auto(tmp_path, written: str, value: object):
    cfg = load_config(write(tmp_path, MINIMAL + f"train:\n  packing: {written}\n"))
    assert cfg.train.packing == value and type(cfg.train.packing) is type(value)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_can_supply_a_whole_config_to_an_empty_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, ""), ["base_model=gpt2", "data.path=tatsu-lab/alpaca"])
    assert (cfg.base_model, cfg.data.path) == ("gpt2", "tatsu-lab/alpaca")


def test_override_problems_name_the_override_not_a_line(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  lr: 1e-3\n")
    problems = problems_of(path, ("train.lr=fast", "train.learning_rate=1e-4", "nokey", "lora.r=[1"))
    assert "--set train.lr=fast: train.lr: expected a number, got 'fast'" in problems
    assert ("--set train.learning_rate=1e-4: unknown key 'train.learning_rate' (did you mean 'train.lr'?)"
            in problems)
    assert any(p.startswith("--set 'nokey': expected KEY=VALUE") for p in problems)
    assert any(p.startswith("--set lora.r=[1: cannot parse the value") for p in problems)
    assert not any(p.startswith("line") for p in problems)
    assert len(problems) == 4


# --- round trip ---------------------------------------------------------------------------------------------


def test_to_dict_is_json_and_round_trips(tmp_path, monkeypatch):
    (tmp_path / "eval.jsonl").write_text("{}\n")
    path = write(tmp_path, MINIMAL + "  eval: eval.jsonl\nlora:\n  target_modules: [q_proj]\ntrain:\n  max_steps: 3\n")
    cfg = load_config(path, ["destination=alice/x"])
    data = json.loads(json.dumps(cfg.to_dict()))
    monkeypatch.chdir(tmp_path.parent)  # resolved paths are absolute, so the folder no longer matters
    again = config_from_dict(data)
    assert again == cfg
    assert again.to_dict() == data
    assert data["train"]["lr"] == 2e-4 and data["data"]["eval"] == str(tmp_path / "eval.jsonl")


def test_to_dict_is_a_copy(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "lora:\n  target_modules: [q_proj]\n"))
    cfg.to_dict()["lora"]["target_modules"].append("v_proj")
    assert cfg.lora.target_modules == ["q_proj"]


# --- each kind of problem -----------------------------------------------------------------------------------


def test_unknown_key_names_its_line_and_suggests_the_right_key(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  batch_size: 4\n  learnin_rate: 1e-4\n")
    assert problems_of(path) == ["line 6: unknown key 'train.learnin_rate' (did you mean 'train.lr'?)"]


def test_unknown_key_suggestions_cross_sections_and_use_aliases(tmp_path):
    path = write(tmp_path, MINIMAL + "lr: 1e-4\ntrain:\n  r: 8\n  gradient_accumulation_steps: 4\n  zzz: 1\n")
    assert problems_of(path) == [
        "line 4: unknown key 'lr' (did you mean 'train.lr'?)",
        "line 6: unknown key 'train.r' (did you mean 'lora.r'?)",
        "line 7: unknown key 'train.gradient_accumulation_steps' (did you mean 'train.grad_accum'?)",
        "line 8: unknown key 'train.zzz'",
    ]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("train:\n  lr: fast\n", "line 5: train.lr: expected a number, got 'fast'"),
        ("train:\n  lr: .nan\n", "line 5: train.lr: expected a number, got nan"),
        ("train:\n  batch_size: true\n", "line 5: train.batch_size: expected an integer, got true"),
        ("train:\n  batch_size: 2.5\n", "line 5: train.batch_size: expected an integer, got 2.5"),
        ("train:\n  batch_size: '8'\n", "line 5: train.batch_size: expected an integer, got '8'"),
        ("train:\n  packing: 1\n", "line 5: train.packing: expected true or false or auto, got 1"),
        ("train:\n  max_steps: ten\n", "line 5: train.max_steps: expected an integer or null, got 'ten'"),
        ("lora:\n  target_modules: [q_proj, 3]\n",
         "line 5: lora.target_modules: expected a string or a list of strings, got ['q_proj', 3]"),
        ("lora:\n  target_modules: []\n", "line 5: lora.target_modules: must not be empty"),
        ("train: [1, 2]\n", "line 4: train: expected a mapping of keys, got [1, 2]"),
    ],
)
def test_wrong_types_name_key_line_and_expected_type(tmp_path, yaml_text, expected):
    assert problems_of(write(tmp_path, MINIMAL + yaml_text)) == [expected]


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("train:\n  lr: 0\n", "line 5: train.lr: must be > 0, got 0.0"),
        ("lora:\n  r: 0\n", "line 5: lora.r: must be > 0, got 0"),
        ("lora:\n  dropout: 1\n", "line 5: lora.dropout: must be in [0, 1), got 1.0"),
        ("lora:\n  alpha: -1\n", "line 5: lora.alpha: must be > 0, got -1.0"),
        ("train:\n  warmup_steps: -1\n", "line 5: train.warmup_steps: must be >= 0, got -1"),
        ("train:\n  max_steps: 0\n", "line 5: train.max_steps: must be > 0, got 0"),
        ("train:\n  early_stopping_patience: 0\n", "line 5: train.early_stopping_patience: must be > 0, got 0"),
        ("  eval: 1.5\n", "line 4: data.eval: must be in (0, 1), got 1.5"),
        ("  eval: 0\n", "line 4: data.eval: must be in (0, 1), got 0.0"),
        ("  max_seq_len: 0\n", "line 4: data.max_seq_len: must be > 0, got 0"),
    ],
)
def test_out_of_range_values(tmp_path, yaml_text, expected):
    assert problems_of(write(tmp_path, MINIMAL + yaml_text)) == [expected]


def test_bad_enum_lists_accepted_values(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  scheduler: cosin\n  precision: fp8\n")
    assert problems_of(path) == [
        "line 5: train.scheduler: must be one of cosine, linear, constant; got 'cosin'",
        "line 6: train.precision: must be one of auto, bf16, fp16, fp32; got 'fp8'",
    ]


def test_missing_required_keys(tmp_path):
    assert problems_of(write(tmp_path, "train:\n  lr: 1e-4\n")) == [
        "missing required key 'base_model'", "missing required key 'data.path'"]
    assert problems_of(write(tmp_path, "base_model: gpt2\ndata:\n  format: text\n")) == [
        "line 2: missing required key 'data.path'"]


def test_invalid_destination_is_reported(tmp_path):
    (problem,) = problems_of(write(tmp_path, MINIMAL + "destination: Alice\n"))
    assert problem.startswith("line 4: destination: invalid model name 'Alice'")


def test_a_broken_data_section_is_reported_once(tmp_path):
    path = write(tmp_path, "base_model: gpt2\ndata: rows.jsonl\ntrain:\n  early_stopping_patience: 2\n")
    assert problems_of(path) == ["line 2: data: expected a mapping of keys, got 'rows.jsonl'"]


def test_early_stopping_needs_an_eval_set(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  early_stopping_patience: 3\n")
    (problem,) = problems_of(path)
    assert problem.startswith("line 5: train.early_stopping_patience: needs an eval set")
    assert load_config(path, ["data.eval=0.1"]).train.early_stopping_patience == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- a\n- b\n", "expected a mapping of keys at the top level, got ['a', 'b']"),
     ("", "expected a mapping of keys at the top level, got an empty document"),
     ("just words\n", "expected a mapping of keys at the top level, got 'just words'")],
)
def test_top_level_must_be_a_mapping(tmp_path, text, expected):
    assert problems_of(write(tmp_path, text)) == [expected]


@pytest.mark.parametrize("text", ["train: &t {lr: *t}", "lora: &l {target_modules: [q_proj, *l]}",
                                  "extra: &x [1, *x]"])
def test_a_yaml_anchor_that_contains_itself_is_one_problem(tmp_path, text):
    path = write(tmp_path, MINIMAL + text + "\n")
    assert problems_of(path) == ["line 4: invalid YAML: the value anchored here (&name) contains its own alias "
                                 "(*name); write the value out"]


def test_seed_must_fit_numpy(tmp_path):
    assert load_config(write(tmp_path, MINIMAL + "train: {seed: 4294967295}\n")).train.seed == 2**32 - 1
    assert problems_of(write(tmp_path, MINIMAL + "train: {seed: 4294967296}\n")) == [
        "line 4: train.seed: must be in [0, 4294967296), got 4294967296"]


def test_unparseable_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "base_model: gpt2\ndata:\n  path: x\n  bad: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line ") and "invalid YAML" in message
    (problem,) = info.value.problems
    assert problem.startswith("line 5:")  # the unclosed flow sequence is noticed at the end of the document


def test_duplicate_keys_are_reported(tmp_path):
    path = write(tmp_path, MINIMAL + "train:\n  lr: 1e-4\n  lr: 2e-4\n")
    assert problems_of(path) == ["line 6: duplicate key 'train.lr' (first set at line 5)"]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config file not found"


def test_config_error_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError) as info:
        load_config(write(tmp_path, "x: 1\n"))
    assert info.value.exit_code == 2


# --- many problems at once ----------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_in_line_order(tmp_path):
    path = write(tmp_path, """\
        base_model: 7
        data:
          format: csv
        lora:
          r: -2
          dropout: fast
        train:
          learning_rate: 1e-4
          batch_size: true
    """)
    problems = problems_of(path, ("train.epochs=0",))
    assert problems == [
        "line 1: base_model: expected a string, got 7",
        "line 2: missing required key 'data.path'",
        "line 3: data.format: must be one of auto, alpaca, prompt_completion, messages, text, preference; got 'csv'",
        "line 5: lora.r: must be > 0, got -2",
        "line 6: lora.dropout: expected a number, got 'fast'",
        "line 8: unknown key 'train.learning_rate' (did you mean 'train.lr'?)",
        "line 9: train.batch_size: expected an integer, got true",
        "--set train.epochs=0: train.epochs: must be > 0, got 0.0",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(path, ("train.epochs=0",))
    assert str(info.value).startswith(f"{path}: 8 problems: line 1: base_model")
    # the same problems by the key each is about, for a form to place (the web app's Train tab)
    assert [p["field"] for p in info.value.fields] == [
        "base_model", "data.path", "data.format", "lora.r", "lora.dropout", "train.learning_rate",
        "train.batch_size", "train.epochs"]
    assert [p["message"] for p in info.value.fields] == problems


# --- relative paths -----------------------------------------------------------------------------------------


def test_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "data").mkdir()
    (folder / "data" / "evalset").write_text("{}\n")  # exists, though it has no data suffix
    path = write(folder, "base_model: ./models/base\ndata:\n  path: ../rows.jsonl\n  eval: data/evalset\n")
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_config(path)
    assert cfg.data.path == str(tmp_path / "rows.jsonl")  # not required to exist; ../ says it is a path
    assert cfg.data.eval == str(folder / "data" / "evalset")
    assert cfg.base_model == str(folder / "models" / "base")


def test_missing_files_with_data_suffix_still_resolve_so_errors_name_the_real_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_config(write(tmp_path, MINIMAL + "  eval: held/out.jsonl\n"))
    assert cfg.data.path == str(tmp_path / "rows.jsonl")
    assert cfg.data.eval == str(tmp_path / "held" / "out.jsonl")


def test_hub_names_and_registry_refs_are_kept_as_written(tmp_path):
    (tmp_path / "local").mkdir()  # a folder that shares a name's prefix must not capture a ref
    cfg = load_config(write(tmp_path, "base_model: local/tiny\ndata:\n  path: tatsu-lab/alpaca\n"))
    assert cfg.base_model == "local/tiny"
    assert cfg.data.path == "tatsu-lab/alpaca"


def test_overridden_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(write(folder, MINIMAL), ["data.path=mine.jsonl", "data.eval=./ev.jsonl"])
    assert cfg.data.path == str(work / "mine.jsonl")
    assert cfg.data.eval == str(work / "ev.jsonl")


def test_absolute_paths_are_kept_and_dicts_use_base_dir(tmp_path):
    absolute = str(tmp_path / "abs.jsonl")
    cfg = config_from_dict({"base_model": "gpt2", "data": {"path": absolute}})
    assert cfg.data.path == absolute
    cfg = config_from_dict({"base_model": "gpt2", "data": {"path": "x.jsonl"}}, base_dir=tmp_path)
    assert cfg.data.path == str(tmp_path / "x.jsonl")


def test_config_from_dict_reports_without_line_numbers():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"base_model": "gpt2", "data": {"path": "x"}, "train": {"lr": "fast"}}, source="stored")
    assert info.value.problems == ["train.lr: expected a number, got 'fast'"]
    assert info.value.source == "stored"


def test_config_requires_keywords():
    with pytest.raises(TypeError):
        Config("gpt2", None, DataConfig(path="x"))  # type: ignore[misc]


# --- the models are the definition --------------------------------------------------------------------------


def _bounded(schema: dict) -> list[tuple[str, str, float]]:
    """(kind, type, bound) of each numeric bound a property's JSON schema declares (its union members too)."""
    found = []
    for member in schema.get("anyOf", [schema]):
        for kind in ("minimum", "exclusiveMinimum", "exclusiveMaximum"):
            if kind in member:
                found.append((kind, member["type"], member[kind]))
    return found


def _with(section: str, key: str, value: object) -> dict:
    raw: dict = {"base_model": "gpt2", "data": {"path": "x"}}
    raw[section] = {**raw.get(section, {}), key: value}
    return raw


@pytest.mark.parametrize("section", [DataConfig, LoraConfig, TrainConfig])
def test_every_declared_bound_and_type_is_checked_and_named(section):
    """Each field's bounds come from its model (its JSON schema shows them): a value past one is refused with
    the key and the range, and a value of no accepted type says what was expected."""
    name = {DataConfig: "data", LoraConfig: "lora", TrainConfig: "train"}[section]
    bounds = 0
    for key, prop in section.model_json_schema()["properties"].items():
        for kind, typ, bound in _bounded(prop):
            bounds += 1
            bad = {"minimum": bound - 1, "exclusiveMinimum": bound, "exclusiveMaximum": bound}[kind]
            bad = int(bad) if typ == "integer" else float(bad)
            with pytest.raises(ConfigError) as info:
                config_from_dict(_with(name, key, bad))
            (problem,) = info.value.problems
            assert problem.startswith(f"{name}.{key}: must be ") and problem.endswith(f"got {bad!r}"), problem
        with pytest.raises(ConfigError) as info:
            config_from_dict(_with(name, key, {"no": 1}))
        assert info.value.fields == [{"field": f"{name}.{key}",
                                      "message": info.value.problems[0]}]
        assert info.value.problems[0].startswith(f"{name}.{key}: expected ") and "got a mapping" in \
            info.value.problems[0]
    assert bounds >= 2
