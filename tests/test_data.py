"""Tests for finetune.data: reading, formats, label masks, prompt/training agreement, splits and the cache."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import datasets
import pytest

import finetune.data.prepare as preparing
from finetune.data import formats
from finetune.data.formats import IGNORE_INDEX, encode_prompt, encode_record, prompt_for
from finetune.data.prepare import prepare
from finetune.data.records import read_records
from finetune.errors import DataError, UsageError
from finetune.tiny import train_tokenizer

CORPUS = [
    "What is the capital of France? Paris. Name a color: red, green, blue.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n hello world the quick brown fox jumps over the lazy dog",
]
ALPACA = {"instruction": "Name a color.", "input": "", "output": "red"}
CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "A color?"},
    {"role": "assistant", "content": "blue"},
]}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def learned_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------- templates, masks


def test_alpaca_template_text_is_exact():
    assert formats.alpaca_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response:\n")
    assert formats.alpaca_prompt("Do X.", "some input") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n"
        "### Input:\nsome input\n\n### Response:\n")


@pytest.mark.parametrize("fmt,record,completion", [
    ("alpaca", ALPACA, "red"),
    ("prompt_completion", {"prompt": "Capital of France? ", "completion": "Paris."}, "Paris."),
])
def test_prompt_masked_completion_and_eos_learned(tok, fmt, record, completion):
    ids, labels = encode_record(record, fmt, tok, train_on_inputs=False)
    assert len(ids) == len(labels)
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert learned_text(tok, ids, labels) == completion + tok.eos_token
    assert tok.pad_token_id not in ids
    ids2, labels2 = encode_record(record, fmt, tok, train_on_inputs=True)
    assert ids2 == ids and labels2 == ids


def test_text_learns_everything_and_ends_with_eos(tok):
    ids, labels = encode_record({"text": "hello world"}, "text", tok, train_on_inputs=False)
    assert labels == ids and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == "hello world"


def test_masking_ignores_token_identity_when_pad_is_eos(tok):
    # The pad==eos bug: masks derived from "is this token pad?" would unlearn the final eos.
    same = copy.deepcopy(tok)
    same.pad_token = same.eos_token
    assert encode_record(ALPACA, "alpaca", same, False) == encode_record(ALPACA, "alpaca", tok, False)
    assert encode_record(ALPACA, "alpaca", same, False)[1][-1] == same.eos_token_id


def test_messages_learn_only_assistant_turns_and_their_end(tok):
    ids, labels = encode_record(CHAT, "messages", tok, train_on_inputs=False)
    assert learned_text(tok, ids, labels) == f"Paris.{tok.eos_token}\nblue{tok.eos_token}\n"
    full = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tok.decode(ids) == full  # the concatenated pieces are the whole rendered conversation
    assert ids.count(tok.bos_token_id) == 1  # the template writes bos; no second one is added
    _, all_labels = encode_record(CHAT, "messages", tok, train_on_inputs=True)
    assert all_labels == ids


def test_sharegpt_conversations_are_normalized(tok):
    share = {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]}
    plain = {"messages": [{"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}]}
    assert encode_record(share, "auto", tok, False) == encode_record(plain, "messages", tok, False)


def test_messages_without_chat_template_is_a_data_error(tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template.*format: text"):
        encode_record(CHAT, "messages", bare, False)


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="renders turn 3 differently"):
        encode_record(CHAT, "messages", odd, False, where="chat.jsonl:4")


@pytest.mark.parametrize("fmt,record,raw", [
    ("alpaca", ALPACA, "Name a color."),
    ("prompt_completion", {"prompt": "Capital of France? ", "completion": "Paris."}, "Capital of France? "),
    ("messages", {"messages": CHAT["messages"][1:3]}, "Capital of France?"),
])
def test_inference_prompt_ids_equal_training_prefix(tok, fmt, record, raw):
    ids, labels = encode_record(record, fmt, tok, train_on_inputs=False)
    prompt = encode_prompt(fmt, tok, prompt_for(fmt, tok, raw))
    assert ids[: len(prompt)] == prompt
    assert all(lab == IGNORE_INDEX for lab in labels[: len(prompt)]) and labels[len(prompt)] != IGNORE_INDEX


def test_inference_prompt_with_system_and_text(tok):
    record = {"messages": CHAT["messages"][:3]}
    ids, _ = encode_record(record, "messages", tok, False)
    prompt = encode_prompt("messages", tok, prompt_for("messages", tok, "Capital of France?", system="Be brief."))
    assert ids[: len(prompt)] == prompt
    ids, _ = encode_record({"text": "hello world"}, "text", tok, False)
    assert encode_prompt("text", tok, prompt_for("text", tok, "hello world")) == ids[:-1]
    with pytest.raises(UsageError, match="system"):
        prompt_for("alpaca", tok, "x", system="s")


# ------------------------------------------------------------------------------------------- formats, fields


@pytest.mark.parametrize("columns,fmt", [
    (["instruction", "input", "output"], "alpaca"),
    (["instruction", "output", "text"], "alpaca"),
    (["prompt", "completion"], "prompt_completion"),
    (["messages"], "messages"),
    (["conversations", "id"], "messages"),
    (["text", "meta"], "text"),
])
def test_detect_format(columns, fmt):
    assert formats.detect_format(columns) == fmt


def test_unknown_columns_error_lists_columns_and_needs():
    with pytest.raises(DataError, match=r"\['answer', 'question'\].*alpaca needs 'instruction' and 'output'"):
        formats.detect_format(["question", "answer"])


def test_field_errors_name_line_and_field(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:3: field 'output' is missing"):
        prepare(str(path), "auto", tok, max_seq_len=64, train_on_inputs=False)
    write_jsonl(path, [ALPACA, {"instruction": "x", "output": 5}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'output' must be a string, got int"):
        prepare(str(path), "alpaca", tok, max_seq_len=64, train_on_inputs=False)


def test_a_conversation_opening_with_an_assistant_turn_says_so(tmp_path, tok):
    opening = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi."},
                            {"role": "user", "content": "A color?"}, {"role": "assistant", "content": "blue"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, opening])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: message 2 is an assistant turn with no user turn before it"
                                        r" — start the conversation with a user turn"):
        prepare(str(path), "auto", tok, max_seq_len=256, train_on_inputs=False)


def test_a_json_line_that_is_not_an_object_is_named(tmp_path, tok):
    for rows, line in (([["Name a color.", "red"]], 1), ([{"text": "hi"}, ["Name a color.", "red"]], 2),
                       ([[{"text": "hi"}], {"text": "ho"}], 1)):
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=rf"d\.jsonl:{line}: a JSON list, not an object — each line must be one"):
            prepare(str(path), "auto", tok, max_seq_len=64, train_on_inputs=False)


def test_explicit_format_checks_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    with pytest.raises(DataError, match=r"format alpaca needs .* columns are \['text'\]"):
        prepare(str(path), "alpaca", tok, max_seq_len=64, train_on_inputs=False)


# ------------------------------------------------------------------------------------------- reading


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n\n" + json.dumps(ALPACA) + "\n" + '{"instruction": "x",\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:4: invalid JSON"):
        read_records(str(path))


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        read_records(str(path))


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ALPACA, ALPACA]))
    (tmp_path / "b.json").write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n")
    assert read_records(str(tmp_path / "a.json")).num_rows == 2
    assert read_records(str(tmp_path / "b.json")).num_rows == 2


@pytest.mark.parametrize("content,match", [("", "is empty"), ("[]", "no records"), ("\n\n", "no records")])
def test_empty_files_are_errors(tmp_path, content, match):
    path = tmp_path / "e.json"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_records(str(path))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl, \.json, \.csv, \.parquet"):
        read_records(str(tmp_path / "d.txt"))


def test_csv_keeps_cells_as_strings(tmp_path, tok):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\n"Say ""NA"".",,NA\nA number,,007\n"Two\nlines",x,y\n')
    records = read_records(str(path))
    assert records["output"] == ["NA", "007", "y"] and records["input"] == [None, None, "x"]
    ids, labels = encode_record(records[1], "alpaca", tok, False)
    assert learned_text(tok, ids, labels) == "007" + tok.eos_token


def test_parquet(tmp_path, tok):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}] * 3).to_parquet(str(path))
    result = prepare(str(path), "auto", tok, max_seq_len=64, train_on_inputs=False)
    assert result.info["format"] == "prompt_completion" and result.train.num_rows == 3


def test_hub_ids_go_to_load_dataset(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or
                        datasets.Dataset.from_list([{"text": "x"}]))
    assert read_records("someone/some-data").num_rows == 1
    assert calls == [(("someone/some-data",), {"split": "train"})]
    with pytest.raises(DataError, match="not found"):
        read_records("some-data")  # no owner: a mistyped local file, not a hub id


# ------------------------------------------------------------------------------------------- prepare


def test_prepare_info_and_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, {"instruction": "Say hi", "output": "hi"}])
    result = prepare(str(path), "auto", tok, max_seq_len=512, train_on_inputs=False)
    info = result.info
    assert result.train.column_names == ["input_ids", "labels", "length"] and result.eval is None
    assert info["format"] == "alpaca" and info["template"] == "alpaca" and info["rows"] == 2
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and info["path"] == str(path)
    assert info["train_tokens"] == sum(result.train["length"])
    assert info["label_tokens"] == sum(lab != IGNORE_INDEX for row in result.train["labels"] for lab in row)
    assert result.train[0]["input_ids"] == encode_record(ALPACA, "alpaca", tok, False)[0]  # order kept
    assert "\n" not in preparing.format_summary(info) and "alpaca" in preparing.format_summary(info)


def test_prepare_messages_records_template_hash(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    info = prepare(str(path), "auto", tok, max_seq_len=512, train_on_inputs=False).info
    assert info["format"] == "messages"
    assert info["template_sha256"] == hashlib.sha256(tok.chat_template.encode()).hexdigest()


def test_overlong_truncate_counts_and_drops(tmp_path, tok):
    long_prompt = {"prompt": "hello world " * 40, "completion": "red"}
    long_answer = {"prompt": "hi", "completion": "blue green " * 40}
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}, long_prompt, long_answer])
    result = prepare(str(path), "prompt_completion", tok, max_seq_len=32, train_on_inputs=False)
    assert (result.info["truncated"], result.info["dropped"], result.train.num_rows) == (1, 1, 2)
    assert max(result.train["length"]) == 32
    with pytest.raises(DataError, match=r"p\.jsonl:2: \d+ tokens, longer than max_seq_len 32"):
        prepare(str(path), "prompt_completion", tok, max_seq_len=32, train_on_inputs=False, overlong="error")


def test_nothing_left_after_filtering_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello world " * 40, "completion": "x"}])
    with pytest.raises(DataError, match="no training rows left"):
        prepare(str(path), "auto", tok, max_seq_len=16, train_on_inputs=False)


def test_eval_fraction_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = prepare(str(path), "auto", tok, max_seq_len=64, train_on_inputs=False, eval=0.25, seed=1)
    b = prepare(str(path), "auto", tok, max_seq_len=64, train_on_inputs=False, eval=0.25, seed=1)
    c = prepare(str(path), "auto", tok, max_seq_len=64, train_on_inputs=False, eval=0.25, seed=2)
    assert (a.info["train_rows"], a.info["eval_rows"]) == (15, 5)
    assert a.eval["input_ids"] == b.eval["input_ids"] and a.eval["input_ids"] != c.eval["input_ids"]
    train, held = {tuple(x) for x in a.train["input_ids"]}, {tuple(x) for x in a.eval["input_ids"]}
    assert not train & held and len(train | held) == 20
    order = [tok.decode(x) for x in a.train["input_ids"]]
    assert order == sorted(order, key=lambda s: int(s.split("p")[1].split("c")[0]))  # source order kept


def test_eval_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    held = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "c", "completion": "d"}] * 2)
    result = prepare(str(path), "auto", tok, max_seq_len=64, train_on_inputs=False, eval=str(held))
    assert (result.info["train_rows"], result.info["eval_rows"]) == (4, 2)
    assert result.info["eval_sha256"] == hashlib.sha256(held.read_bytes()).hexdigest()


def test_cache_hit_skips_tokenization_and_misses_on_change(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(6)])
    cache = tmp_path / "cache"
    kw = dict(max_seq_len=64, train_on_inputs=False, eval=0.5, cache_dir=str(cache))
    first = prepare(str(path), "auto", tok, **kw)
    assert first.info["cache_hit"] is False
    real = preparing._encode_dataset
    monkeypatch.setattr(preparing, "_encode_dataset", lambda *a, **k: pytest.fail("tokenized despite a cache entry"))
    second = prepare(str(path), "auto", tok, **kw)
    assert second.info["cache_hit"] is True
    assert second.train["input_ids"] == first.train["input_ids"] and second.eval["labels"] == first.eval["labels"]
    assert {k: v for k, v in second.info.items() if k != "cache_hit"} == \
           {k: v for k, v in first.info.items() if k != "cache_hit"}
    assert [p.name for p in cache.iterdir() if p.name.startswith(".tmp")] == []
    monkeypatch.setattr(preparing, "_encode_dataset", real)
    assert prepare(str(path), "auto", tok, **{**kw, "max_seq_len": 65}).info["cache_hit"] is False
    assert prepare(str(path), "auto", tok, **{**kw, "train_on_inputs": True}).info["cache_hit"] is False
    write_jsonl(path, [{"prompt": f"q{i}", "completion": "c"} for i in range(6)])
    assert prepare(str(path), "auto", tok, **kw).info["cache_hit"] is False


def test_bad_arguments_are_usage_errors(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA])
    for kwargs in ({"overlong": "cut"}, {"max_seq_len": 0}, {"eval": 1.5}):
        with pytest.raises(UsageError):
            prepare(str(path), "auto", tok, **{"max_seq_len": 64, "train_on_inputs": False, **kwargs})


def test_tokenizer_fingerprint_tracks_what_decides_ids(tok):
    before = preparing.tokenizer_fingerprint(tok)
    tok(["a b c d e f", "a"], padding=True, truncation=True, max_length=3)  # leaves call-time state behind
    assert preparing.tokenizer_fingerprint(tok) == before
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template + " "
    assert preparing.tokenizer_fingerprint(other) != before
