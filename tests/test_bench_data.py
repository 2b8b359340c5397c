"""scripts/bench_data.py: the benchmark's data sets (alpaca, long, text) and widened vocabularies."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from scripts_dir import load_script

from finetune.data.formats import IGNORE_INDEX
from finetune.tiny import load_sample_records


def _script():
    return load_script("bench_data")


def test_long_rows_are_those_with_the_longest_answers_in_file_order():
    bench = _script()
    records = [{"instruction": f"q{i}", "output": "x" * n} for i, n in enumerate([5, 50, 1, 50, 20, 7])]
    picked = bench.long_rows(records, count=3)
    assert [r["instruction"] for r in picked] == ["q1", "q3", "q4"]


def test_text_documents_hold_every_row_once_in_order():
    bench = _script()
    records = load_sample_records()
    docs = bench.text_documents(records, chars=600)
    assert all(set(d) == {"text"} for d in docs)
    assert all(len(d["text"]) >= 600 - 2 for d in docs[:-1])  # only the last may be short
    joined = "\n\n".join(d["text"] for d in docs)
    assert joined == "\n\n".join(bench.alpaca_text(r) for r in records)
    assert bench.split(docs, held_out=200)[1] == docs[: len(docs) // 5]  # held out: at most a fifth


def test_text_carries_loss_on_every_token_and_alpaca_on_its_completions(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    import finetune.data.prepare as preparing

    bench = _script()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = load_sample_records()
    shares = {}
    for kind in bench.KINDS:
        path = tmp_path / f"{kind}.jsonl"
        bench.write_jsonl(path, bench.build_records(records, kind))
        data = preparing.prepare(str(path), bench.FORMATS[kind], tok, max_seq_len=512, train_on_inputs=False,
                                 cache_dir=str(tmp_path / "cache")).train
        shares[kind] = bench.loss_share(data)
        if kind == "text":
            labels = [x for row in data["labels"] for x in row]
            assert sum(x == IGNORE_INDEX for x in labels) <= len(data)  # at most each row's bos is unlabelled
    assert shares["text"] > 0.95
    assert shares["alpaca"] < shares["long"] < shares["text"]


def test_widened_vocabulary_keeps_the_old_rows_and_ties(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    bench = _script()
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old = before.get_input_embeddings().weight.shape[0]
    outs = []
    for name in ("a", "b"):
        model_dir = tmp_path / name
        shutil.copytree(tiny_model_dir, model_dir)
        bench.widen_vocabulary(model_dir, 4096, seed=3)
        outs.append(AutoModelForCausalLM.from_pretrained(model_dir))
    widened = outs[0]
    emb, head = widened.get_input_embeddings().weight, widened.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == widened.config.vocab_size == 4096
    assert torch.equal(emb[:old], before.get_input_embeddings().weight)
    assert emb.data_ptr() == head.data_ptr()  # the tiny Llama's head stays tied
    std = before.config.initializer_range
    assert 0.8 * std < float(emb[old:].detach().std()) < 1.2 * std
    assert torch.equal(emb, outs[1].get_input_embeddings().weight)  # seeded: the same rows every time
    logits = widened(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape[-1] == 4096


def test_dpo_pairs_are_built_from_the_training_split_and_held_out_apart(tmp_path: Path):
    """scripts/bench_dpo.py's pairs: chosen is the row's answer, rejected never equals it, and the held-out pairs
    come from the rows no contender trains on."""
    import json

    from finetune.data.preference import pair_parts

    bench_dpo = load_script("bench_dpo")
    records = [{"instruction": f"question {i}", "input": "", "output": f"answer number {i} in four words"}
               for i in range(50)]
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(records))
    paths = bench_dpo.write_pairs(source, tmp_path, rows=8)
    train = [json.loads(line) for line in Path(paths["pairs"]).read_text().splitlines()]
    held = [json.loads(line) for line in Path(paths["held_out_pairs"]).read_text().splitlines()]
    assert len(train) == 8 and len(held) == 10  # a fifth of 50 rows is held out
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}
    for pair in train + held:
        prompt, chosen, rejected = pair_parts(pair)
        assert chosen != rejected and "question" in prompt
