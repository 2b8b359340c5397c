"""Bad input to `finetune train`: each case exits non-zero with ONE line naming the problem (and where), publishes
nothing, and leaves its training record ``failed`` with that line as the error when a record was opened.

Config problems are caught before a record exists; data and model problems after (the record then tells
`finetune trainings list` what went wrong). Everything here runs in-process and fails before training, except
the truncation count, which trains one step.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.errors import ModelNotFoundError
from finetune.registry import Registry
from finetune.registry.jobs import Trainings
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

DEST = "err/dest"


@pytest.fixture(scope="module")
def root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with the tiny base, a copy of it whose tokenizer has no chat template, and the destination."""
    tmp = tmp_path_factory.mktemp("train-errors")
    nochat = tmp / "nochat"
    shutil.copytree(tiny_model_dir, nochat)
    (nochat / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((nochat / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (nochat / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(tmp / "registry")
        import_base(reg, "local/tiny", str(tiny_model_dir))
        import_base(reg, "local/nochat", str(nochat))
        reg.create_model(DEST)
    return reg.root


def config_dict(data_path: str | Path, **sections: dict) -> dict:
    cfg = {"base_model": "local/tiny:1", "data": {"path": str(data_path), "max_seq_len": 256},
           "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    return cfg


class Attempt:
    """One `finetune train` call and what it left behind."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str], config: Path | None, *extra: str):
        reg = Registry(root)
        trainings = Trainings(reg)
        before = {r.id for r in trainings.list()}
        versions_before = len(reg.list_versions(DEST))
        argv = ["--registry", str(root), "train", *([str(config)] if config else []), "--quiet"]
        argv += list(extra) if "--destination" in extra else ["--destination", DEST, *extra]
        self.rc = main(argv)
        self.out, self.err = capsys.readouterr()
        self.records = [r for r in trainings.list() if r.id not in before]
        self.new_versions = len(reg.list_versions(DEST)) - versions_before
        # --quiet prints only `training ID` (when a record was opened) and the error line.
        self.error_lines = [line for line in self.err.splitlines() if not line.startswith("training ")]

    def assert_refused(self, *needles: str, exit_code: int = 1, record: bool = True) -> str:
        assert self.rc == exit_code, (self.rc, self.err)
        assert self.out == ""
        assert len(self.error_lines) == 1, self.err
        line = self.error_lines[0]
        assert line.startswith("finetune: error: ")
        for needle in needles:
            assert needle in line, line
        assert self.new_versions == 0
        if record:
            assert len(self.records) == 1
            rec = self.records[0]
            assert rec.status == "failed" and rec.completed_at and rec.output is None
            assert rec.error == line.removeprefix("finetune: error: ")
        else:
            assert self.records == []
        return line


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA_ROWS = [{"instruction": f"Name color {i}.", "input": "", "output": c}
               for i, c in enumerate(["red", "green", "blue", "teal", "pink", "gold"])]

# ------------------------------------------------------------------------------------------- data problems


def test_missing_data_file(root: Path, tmp_path: Path, capsys):
    missing = tmp_path / "nope.jsonl"
    cfg = write(tmp_path / "c.yaml", config_dict(missing))
    Attempt(root, capsys, cfg).assert_refused("dataset file not found", str(missing))


def test_malformed_data_file_names_file_and_line(root: Path, tmp_path: Path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ALPACA_ROWS[0]) + "\n" + json.dumps(ALPACA_ROWS[1]) + "\n{\"instruction\": \"x\",\n")
    cfg = write(tmp_path / "c.yaml", config_dict(data))
    Attempt(root, capsys, cfg).assert_refused(f"{data}:3", "invalid JSON")
    # datasets logs the parse failure at ERROR level before raising; in a terminal that is a second, vaguer line
    # above ours (its handler writes to the real stderr, which capsys may not see, hence this check).
    assert not logging.getLogger("datasets.packaged_modules.json.json").isEnabledFor(logging.ERROR)


def test_empty_data_file(root: Path, tmp_path: Path, capsys):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    cfg = write(tmp_path / "c.yaml", config_dict(data))
    Attempt(root, capsys, cfg).assert_refused(f"{data} is empty")


def test_unknown_columns_for_the_format_lists_the_columns(root: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Color?", "answer": "red"}] * 4)
    cfg = write(tmp_path / "c.yaml", config_dict(data, data={"format": "alpaca"}))
    Attempt(root, capsys, cfg).assert_refused("format alpaca needs", "['answer', 'question']")
    cfg = write(tmp_path / "auto.yaml", config_dict(data))  # format auto: cannot tell, says what would fit
    Attempt(root, capsys, cfg).assert_refused("cannot tell the data format from columns ['answer', 'question']")


def test_messages_without_a_chat_template(root: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}]}] * 4)
    cfg = write(tmp_path / "c.yaml", config_dict(data, base_model="local/nochat:1"))
    Attempt(root, capsys, cfg).assert_refused(f"{data}:1", "no chat template")


@pytest.mark.parametrize("family,extra,name,why", [
    ("stablelm", {}, "StableLmForCausalLM", "does not mark it as passing sequence bounds"),  # before weights load
    ("lfm2", {"layer_types": ["conv", "full_attention"]}, "Lfm2ForCausalLM", "packed before it"),  # run once
])
def test_a_base_that_cannot_take_packed_rows_trains_padded(root: Path, tmp_path: Path, tiny_model_dir: Path,
                                                           capsys, family: str, extra: dict, name: str, why: str):
    """StableLM runs its own attention over the whole row, LFM2 a convolution along it: packed sequences would see
    each other. StableLM's class says so (checked before its weights load); LFM2's is found by running it once
    after loading, which is then loaded again for padded batches. With ``packing: auto`` (the default) both train
    on padded batches and the log says why; ``packing: true`` is refused, naming the fix."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = tmp_path / family
    config = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tok.save_pretrained(base)
    capsys.readouterr()  # saving's progress bar
    cfg = write(tmp_path / "c.yaml", config_dict(sample_data_path(), base_model=str(base)))
    Attempt(root, capsys, cfg, "--set", "train.packing=true").assert_refused(
        f"cannot train {name}", why, "set train.packing: auto (the default) or false")
    attempt = Attempt(root, capsys, cfg)
    assert attempt.rc == 0, attempt.err
    record = attempt.records[0]
    assert attempt.new_versions == 1 and record.status == "succeeded"
    assert record.metrics["packing"] is False
    log = Trainings(Registry(root)).paths(record.id).log.read_text()
    assert f"packing off: packed attention (finetune_varlen) cannot train {name}" in log
    assert why in log and "training on padded batches" in log


def test_overlong_row_with_overlong_error_names_the_row(root: Path, tmp_path: Path, capsys):
    rows = ALPACA_ROWS[:3] + [{"instruction": "Repeat.", "input": "", "output": "red green blue " * 40}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = write(tmp_path / "c.yaml", config_dict(data, data={"max_seq_len": 64, "overlong": "error"}))
    Attempt(root, capsys, cfg).assert_refused(f"{data}:4", "longer than max_seq_len 64", "overlong: truncate")


def test_overlong_rows_are_truncated_and_counted(root: Path, tmp_path: Path, capsys):
    rows = ALPACA_ROWS + [{"instruction": "Repeat.", "input": "", "output": "red green blue " * 40}] * 2
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = write(tmp_path / "c.yaml", config_dict(data, data={"max_seq_len": 64, "overlong": "truncate"}))
    attempt = Attempt(root, capsys, cfg)
    assert attempt.rc == 0, attempt.err
    version = Registry(root).resolve(attempt.out.strip())
    assert version.metadata["dataset"]["truncated"] == 2
    assert attempt.records[0].status == "succeeded"


def test_a_row_with_nothing_to_learn_everywhere(root: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "long-prompts.jsonl",
                       [{"instruction": "word " * 200, "input": "", "output": "x"}] * 3)
    cfg = write(tmp_path / "c.yaml", config_dict(data, data={"max_seq_len": 32}))
    Attempt(root, capsys, cfg).assert_refused("no training rows left", "raise max_seq_len")


# ------------------------------------------------------------------------------------------- config problems


def test_unknown_config_key_names_key_and_line(root: Path, tmp_path: Path, capsys):
    cfg_dict = config_dict(sample_data_path())
    cfg_dict["train"]["learning_rate"] = 1e-3
    cfg = write(tmp_path / "c.yaml", cfg_dict)
    line = Attempt(root, capsys, cfg).assert_refused("unknown key 'train.learning_rate'", "train.lr", exit_code=2,
                                                     record=False)
    assert str(cfg) in line and "line " in line


def test_wrong_types(root: Path, tmp_path: Path, capsys):
    cfg = write(tmp_path / "c.yaml", config_dict(sample_data_path(), train={"batch_size": "eight"}))
    Attempt(root, capsys, cfg).assert_refused("train.batch_size: expected an integer, got 'eight'", exit_code=2,
                                              record=False)
    cfg = write(tmp_path / "c2.yaml", config_dict(sample_data_path()))
    Attempt(root, capsys, cfg, "--set", "train.packing=maybe").assert_refused(
        "--set train.packing=maybe", "expected true or false or auto, got 'maybe'", exit_code=2, record=False)


@pytest.mark.parametrize("key,value,needle", [
    ("train.lr", "0", "train.lr: must be > 0, got 0"),
    ("train.lr", "-1e-4", "train.lr: must be > 0, got -0.0001"),
    ("lora.r", "0", "lora.r: must be > 0, got 0"),
    ("lora.r", "-4", "lora.r: must be > 0, got -4"),
])
def test_non_positive_lr_and_rank(root: Path, tmp_path: Path, capsys, key: str, value: str, needle: str):
    cfg = write(tmp_path / "c.yaml", config_dict(sample_data_path()))
    Attempt(root, capsys, cfg, "--set", f"{key}={value}").assert_refused(needle, exit_code=2, record=False)


def test_missing_config_file(root: Path, tmp_path: Path, capsys):
    Attempt(root, capsys, tmp_path / "nope.yaml").assert_refused("config file not found", exit_code=2,
                                                                 record=False)


# ------------------------------------------------------------------------------------------- models, destinations


@pytest.mark.parametrize("spec,needle", [
    ("local/nope:1", "base model 'local/nope:1' not found"),
    ("local/tiny:9", "local/tiny"),
    ("./no-such-folder", "no-such-folder"),
    ("nobody/nothing-here", "nobody/nothing-here"),  # looks like a hub id; offline, it cannot load
])
def test_base_model_not_found(root: Path, tmp_path: Path, capsys, spec: str, needle: str):
    cfg = write(tmp_path / "c.yaml", config_dict(sample_data_path(), base_model=spec))
    Attempt(root, capsys, cfg).assert_refused(needle)


def test_nonexistent_destination(root: Path, tmp_path: Path, capsys):
    cfg = write(tmp_path / "c.yaml", config_dict(sample_data_path(), destination="err/missing"))
    line = Attempt(root, capsys, cfg, "--destination", "err/missing").assert_refused(
        "destination model err/missing does not exist", "finetune models create err/missing", record=False)
    assert "--create-destination" in line
    with pytest.raises(ModelNotFoundError):
        Registry(root).get_model("err/missing")  # nothing was created on the way


def test_malformed_destination_name(root: Path, tmp_path: Path, capsys):
    cfg = write(tmp_path / "c.yaml", config_dict(sample_data_path()))
    Attempt(root, capsys, cfg, "--destination", "Not A/Name!").assert_refused(exit_code=2, record=False)
