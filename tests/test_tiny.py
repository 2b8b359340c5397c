"""Tiny local models, the trained tokenizer, and the shipped sample data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import finetune
from finetune.errors import AlreadyExistsError, UsageError
from finetune.tiny import alpaca_texts, build_tiny_model, load_sample_records, sample_data_path, train_tokenizer

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ------------------------------------------------------------------ sample data
def test_sample_data_ships_inside_the_package():
    path = sample_data_path()
    assert path.is_file()
    assert Path(finetune.__file__).parent in path.parents
    assert path.stat().st_size < 100_000


def test_sample_data_records_are_complete_and_distinct():
    lines = [line for line in sample_data_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert 40 <= len(records) <= 80
    for record in records:
        assert set(record) == {"instruction", "input", "output"}, record
        assert all(isinstance(v, str) for v in record.values()), record
        assert record["instruction"].strip() and record["output"].strip(), record
    assert len({(r["instruction"], r["input"]) for r in records}) == len(records)
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    assert records == load_sample_records()


def test_alpaca_texts_render_input_only_when_present():
    with_input, empty_input, no_input = alpaca_texts(
        [
            {"instruction": "Reverse.", "input": "a b", "output": "b a"},
            {"instruction": "Hi?", "input": "", "output": "Hello."},
            {"instruction": "Hi?", "output": "Hello."},
        ]
    )
    assert "### Input:\na b\n\n### Response:\nb a" in with_input
    assert "### Input:" not in empty_input and empty_input.endswith("### Instruction:\nHi?\n\n### Response:\nHello.")
    assert no_input == empty_input


def test_alpaca_texts_fall_back_to_string_and_message_contents():
    texts = list(alpaca_texts([{"prompt": "p", "completion": "c"}, {"messages": [{"role": "user", "content": "m"}]}]))
    assert texts == ["p", "c", "m"]


# ------------------------------------------------------------------ tokenizer
def test_special_tokens_are_distinct_and_pad_is_not_eos(tokenizer):
    ids = [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert None not in ids and len(set(ids)) == 4
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.encode("<|im_start|>", add_special_tokens=False) == [im_start]


def test_encodings_start_with_bos_and_do_not_end_with_eos(tokenizer):
    ids = tokenizer("What is the capital of France?").input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "What is the capital of France?"


def test_tokenizer_is_byte_level_and_respects_the_vocab_cap():
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 3] * 20, vocab_size=300)
    assert len(tok) <= 300
    text = "naïve café 東京 🙂"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_train_tokenizer_rejects_a_vocab_below_the_byte_alphabet():
    with pytest.raises(UsageError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_chat_template_renders_turns_and_generation_prompt(tokenizer):
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert rendered == (
        "<s><|im_start|>system\nAnswer briefly.</s>\n<|im_start|>user\nWhat is the capital of France?</s>\n"
        "<|im_start|>assistant\nParis.</s>\n"
    )
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("</s>\n<|im_start|>assistant\n")


def test_assistant_mask_covers_exactly_the_answer_and_eos(tokenizer):
    out = tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    answer = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(answer) == "Paris.</s>"
    assert answer[-1] == tokenizer.eos_token_id


# ------------------------------------------------------------------ model
def test_tiny_model_loads_back_with_matching_ids(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (tiny_model_dir / "model.safetensors").is_file()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, len(tokenizer))
    assert cfg.initializer_range == pytest.approx(64**-0.5) and cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.model_max_length == cfg.max_position_embeddings
    batch = tokenizer(["Hi", "What is 2 plus 3?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch.input_ids.shape, len(tokenizer)) and torch.isfinite(logits).all()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def test_build_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone(tmp_path):
    kwargs = dict(hidden_size=32, num_layers=1, num_heads=2)
    state = torch.random.get_rng_state()
    a = build_tiny_model(tmp_path / "a", seed=7, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_tiny_model(tmp_path / "b", seed=7, **kwargs)
    c = build_tiny_model(tmp_path / "c", seed=8, **kwargs)
    for name in ("tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_build_uses_a_given_tokenizer_without_changing_it(tmp_path):
    tok = train_tokenizer(["alpha beta gamma delta"] * 5, vocab_size=280)
    before = tok.model_max_length
    out = build_tiny_model(tmp_path / "m", tok, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=64)
    assert tok.model_max_length == before
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(tok)
    assert AutoTokenizer.from_pretrained(out).model_max_length == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
        (dict(num_heads=4, num_kv_heads=3), "divisible by num_kv_heads"),
        (dict(num_layers=0), "num_layers"),
        (dict(hidden_size=12, num_heads=4), "odd"),
    ],
)
def test_build_rejects_impossible_sizes(tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        build_tiny_model(tmp_path / "m", **kwargs)


def test_build_refuses_a_non_empty_folder_and_ambiguous_tokenizer_source(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(AlreadyExistsError):
        build_tiny_model(tmp_path / "full")
    tok = train_tokenizer(["a b c"], vocab_size=280)
    with pytest.raises(UsageError, match="only one"):
        build_tiny_model(tmp_path / "m", tok, texts=["a b c"])
