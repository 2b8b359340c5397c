"""Packed rows behave like separate sequences, and collation never turns padding, a prompt or a neighbour's first
token into a training target.

Isolation is checked on the tiny Llama in fp32 for both ways a packed row can be run: our ``finetune_varlen``
attention (boundaries in ``cu_seq_lens``) and plain SDPA given restarting position ids (transformers then
detects the packing and builds a block-diagonal mask). Label tests go through the real data path
(``data.prepare`` on a file, then ``collate_packed``/``collate_padded`` and :class:`CausalLMLoss`); what the
encoder itself produces per format is covered in test_data.py.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from finetune.data.batching import (
    IGNORE_INDEX,
    collate_packed,
    collate_padded,
    collate_padded_groups,
    label_count,
    pad_id,
    padding_groups,
    plan_epoch,
    real_tokens,
)
from finetune.data.prepare import prepare
from finetune.modeling.ops.attention import VARLEN_ATTENTION, register_varlen_attention
from finetune.modeling.ops.loss import CausalLMLoss
from finetune.tiny import sample_data_path

ATOL = 1e-5  # fp32 logits of magnitude ~1-10; another summation order stays far below this


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _model(tiny_model_dir: Path, attn: str):
    from transformers import AutoModelForCausalLM

    if attn == VARLEN_ATTENTION:
        register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


@pytest.fixture(scope="module")
def sequences(tok) -> list[torch.Tensor]:
    texts = ["Name a color.", "What is the capital of France? Paris is the capital of France.", "red green"]
    return [torch.tensor(tok(t)["input_ids"]) for t in texts]


def _alone(model, sequences: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in sequences])


def _packed_inputs(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    batch = collate_packed([{"input_ids": s.tolist(), "labels": s.tolist()} for s in sequences])
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "cu_seq_lens": batch["cu_seq_lens"]}


def test_varlen_packed_logits_equal_each_sequence_alone(tiny_model_dir: Path, sequences):
    model = _model(tiny_model_dir, VARLEN_ATTENTION)
    packed = _packed_inputs(sequences)
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                    cu_seq_lens_q=packed["cu_seq_lens"], use_cache=False).logits[0]
    alone = _alone(model, sequences)
    assert out.shape == alone.shape
    torch.testing.assert_close(out, alone, atol=ATOL, rtol=0)


def test_varlen_without_boundaries_would_mix_sequences(tiny_model_dir: Path, sequences):
    """The isolation above is the boundaries' doing: without cu_seq_lens the same row attends across them."""
    model = _model(tiny_model_dir, VARLEN_ATTENTION)
    packed = _packed_inputs(sequences)
    with torch.no_grad():
        mixed = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
    assert (mixed - _alone(model, sequences)).abs().max() > 100 * ATOL


def test_sdpa_with_restarting_position_ids_isolates_sequences(tiny_model_dir: Path, sequences):
    model = _model(tiny_model_dir, "sdpa")
    packed = _packed_inputs(sequences)
    alone = _alone(model, sequences)
    with torch.no_grad():
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        # Plain consecutive positions: one long sequence, each token sees its predecessors' tokens.
        unpacked = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(out, alone, atol=ATOL, rtol=0)
    assert (unpacked - alone).abs().max() > 100 * ATOL


@pytest.mark.parametrize("attn", [VARLEN_ATTENTION, "sdpa"])
def test_packed_loss_equals_sum_of_separate_losses(tiny_model_dir: Path, tok, attn: str):
    """Through CausalLMLoss, as training runs it: loss sums and label counts add up per sequence."""
    examples = [{"input_ids": tok(t)["input_ids"], "labels": tok(t)["input_ids"]}
                for t in ("Name a color.", "Write a haiku about the sea and the sky.", "blue")]
    loss_model = CausalLMLoss(_model(tiny_model_dir, attn))
    with torch.no_grad():
        batch = collate_packed(examples)
        if attn != VARLEN_ATTENTION:
            del batch["cu_seq_lens"]  # sdpa finds the boundaries from the position ids
        packed_sum, packed_count = loss_model(**batch)
        sums, counts = zip(*(loss_model(**collate_packed([ex])) for ex in examples))
    assert int(packed_count) == sum(int(c) for c in counts) == sum(label_count(ex["labels"]) for ex in examples)
    torch.testing.assert_close(packed_sum, sum(sums), atol=1e-4, rtol=1e-6)


# ------------------------------------------------------------------------------------------- labels

RECORDS = {
    "alpaca": [{"instruction": "Name a color.", "input": "", "output": "red"},
               {"instruction": "Capital of France?", "input": "Answer briefly.", "output": "Paris is the capital."},
               {"instruction": "Say hi.", "input": "", "output": "hi"}],
    "prompt_completion": [{"prompt": "Name a color: ", "completion": "blue"},
                          {"prompt": "The capital of France is ", "completion": "Paris, a large city."},
                          {"prompt": "2+2=", "completion": "4"}],
    "messages": [{"messages": [{"role": "user", "content": "Name a color."},
                               {"role": "assistant", "content": "green"}]},
                 {"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Capital of France?"},
                               {"role": "assistant", "content": "Paris."},
                               {"role": "user", "content": "And of Italy?"},
                               {"role": "assistant", "content": "Rome."}]}],
    "text": [{"text": "The quick brown fox."}, {"text": "Red, green and blue are colors of light."}],
}


def _prepared(tmp_path: Path, tokenizer, fmt: str):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[fmt]))
    train = prepare(str(path), fmt, tokenizer, max_seq_len=256, train_on_inputs=False).train
    return [train[i] for i in range(len(train))]


def _targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What CausalLMLoss trains on: position t predicts labels[t + 1]; -100 where nothing is learned."""
    return batch["labels"][:, 1:]


def _completion_ends(tokenizer, ex: dict) -> list[int]:
    """Positions of the eos that ends each learned span (a completion, an assistant turn)."""
    labels, eos = ex["labels"], tokenizer.eos_token_id
    return [i for i, t in enumerate(labels) if t == eos and i > 0 and labels[i - 1] != IGNORE_INDEX]


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_packed_targets_per_format(tmp_path: Path, tok, fmt: str):
    examples = _prepared(tmp_path, tok, fmt)
    assert len(examples) == len(RECORDS[fmt])
    batch = collate_packed(examples)
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    starts = batch["cu_seq_lens"][:-1].tolist()
    assert starts == [0, *torch.tensor([len(ex["input_ids"]) for ex in examples]).cumsum(0)[:-1].tolist()]
    # A sequence's first token is never a target: its predecessor in the row belongs to another example.
    assert all(labels[s] == IGNORE_INDEX for s in starts)
    assert batch["position_ids"][0, starts].tolist() == [0] * len(starts)
    targets = _targets(batch)[0]
    assert int((targets != IGNORE_INDEX).sum()) == sum(label_count(ex["labels"]) for ex in examples)
    assert tok.pad_token_id not in targets.tolist() and tok.pad_token_id not in ids.tolist()
    for start, ex in zip(starts, examples):
        ends = _completion_ends(tok, ex)
        assert ends, f"{fmt}: no learned eos in {ex['labels']}"
        for i in ends:  # the eos that ends a completion is learned, in the packed row too
            assert labels[start + i] == tok.eos_token_id
        # and the prompt is not: the first learned position comes after a masked prefix (text learns all)
        first = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE_INDEX)
        assert (first == 0) == (fmt == "text")


@pytest.mark.parametrize("fmt", list(RECORDS))
def test_padded_targets_per_format(tmp_path: Path, tok, fmt: str):
    examples = _prepared(tmp_path, tok, fmt)
    batch = collate_padded(examples, pad_id(tok))
    lengths = [len(ex["input_ids"]) for ex in examples]
    assert min(lengths) < max(lengths)  # there is padding to check
    assert int(batch["attention_mask"].sum()) == sum(lengths) == real_tokens(examples)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["attention_mask"][row, n:].sum() == 0 and batch["attention_mask"][row, :n].all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()  # padding is never a target
        assert batch["labels"][row, 0] == IGNORE_INDEX
        assert batch["labels"][row, 1:n].tolist() == ex["labels"][1:n]
        for i in _completion_ends(tok, ex):
            assert batch["labels"][row, i] == tok.eos_token_id
    targets = _targets(batch)
    assert int((targets != IGNORE_INDEX).sum()) == sum(label_count(ex["labels"]) for ex in examples)


@pytest.fixture(scope="module")
def pad_is_eos_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a tokenizer whose pad token is its eos (as many Llama/Mistral setups do)."""
    out = tmp_path_factory.mktemp("pad-eos") / "model"
    shutil.copytree(tiny_model_dir, out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = cfg["eos_token"]
    cfg_path.write_text(json.dumps(cfg))
    return out


def test_pad_equal_to_eos_still_learns_eos(tmp_path: Path, pad_is_eos_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pad_is_eos_dir)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos and pad_id(tokenizer) == eos
    examples = _prepared(tmp_path, tokenizer, "alpaca")
    batch = collate_padded(examples, pad_id(tokenizer))
    ids, labels = batch["input_ids"], batch["labels"]
    assert int((ids == eos).sum()) > len(examples)  # padding is written with the eos id...
    assert int((labels == eos).sum()) == len(examples)  # ...yet only each completion's own eos is a target
    for row, ex in enumerate(examples):
        assert labels[row, len(ex["input_ids"]) - 1] == eos
    loss_model = CausalLMLoss(_model(pad_is_eos_dir, "sdpa"))
    with torch.no_grad():
        _, count = loss_model(**batch)
    assert int(count) == sum(label_count(ex["labels"]) for ex in examples)


@pytest.mark.parametrize("packed", [True, False])
def test_the_largest_step_comes_first_and_nothing_else_moves(packed: bool):
    """Memory peaks in the first step (a batch that does not fit fails at once): the step with the most tokens
    (padded: the longest example) trades places with the first; every other step keeps its place and examples,
    and how a step is split into micro-batches and processes does not change which steps there are."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 100, (216,), generator=gen).tolist()  # 9 steps of 24 examples
    lengths[150] = 2000  # alone, it makes its step the largest, packed or padded
    counts = [n // 2 for n in lengths]

    def examples(plan: list) -> list[set[int]]:
        return [{j for mb in w.micro_batches for j in mb} for w in plan]

    swapped = 0
    for epoch in range(4):
        plan = plan_epoch(counts, lengths, 4, 3, 2, seed=7, epoch=epoch, packed=packed)
        assert plan == plan_epoch(counts, lengths, 4, 3, 2, seed=7, epoch=epoch, packed=packed)  # every process
        # Equal lengths leave the first step the largest: the shuffled order cut into steps, nothing swapped.
        cut = plan_epoch(counts, [1] * len(lengths), 4, 3, 2, seed=7, epoch=epoch, packed=packed)
        k = next(i for i, step in enumerate(examples(cut)) if 150 in step)
        cut[0], cut[k] = cut[k], cut[0]
        assert plan == cut
        swapped += k != 0
    assert swapped  # the long example was not already in the first step every epoch
    # Where no example stands out, the largest micro-batch is often not in the largest step: still the same steps.
    plain = torch.randint(5, 100, (216,), generator=gen).tolist()
    for epoch in range(4):
        steps = examples(plan_epoch(counts, plain, 4, 3, 2, seed=7, epoch=epoch, packed=packed))
        for split in ((12, 1, 2), (2, 6, 2), (24, 1, 1), (6, 2, 2), (1, 24, 1)):  # 24 examples per step
            assert examples(plan_epoch(counts, plain, *split, seed=7, epoch=epoch, packed=packed)) == steps, split


def _set_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in _set_partitions(rest):
        yield [[first], *partition]
        for k in range(len(partition)):
            yield [*partition[:k], [first, *partition[k]], *partition[k + 1:]]


def _padded_cost(lengths: list[int], groups: list[list[int]], call_cost: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + call_cost for g in groups)


@pytest.mark.parametrize("call_cost", [0, 16, 64, 256])
def test_padding_groups_are_the_cheapest_split(call_cost: int):
    """Every example in exactly one group, shortest first, and no split of the micro-batch into groups (any
    grouping, not only runs of the sorted lengths) pads fewer tokens plus ``call_cost`` per group."""
    rng = random.Random(call_cost)
    split_somewhere = 0
    for _ in range(60):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 7))]
        groups = padding_groups(lengths, call_cost)
        flat = [i for g in groups for i in g]
        assert sorted(flat) == list(range(len(lengths)))
        assert [lengths[i] for i in flat] == sorted(lengths)
        best = min(_padded_cost(lengths, p, call_cost) for p in _set_partitions(list(range(len(lengths)))))
        assert _padded_cost(lengths, groups, call_cost) == best
        split_somewhere += len(groups) > 1
    assert split_somewhere


def test_padding_groups_edges():
    assert padding_groups([30, 10, 20], None) == [[1, 2, 0]]  # kept whole (GPUs), still shortest first
    assert padding_groups([30, 10, 20], 0) == [[1], [2], [0]]  # no padding at all when a pass costs nothing
    assert padding_groups([5, 5, 5, 5], 0) == [[0, 1, 2, 3]]  # equal lengths: one group, whatever the cost
    assert padding_groups([7], 64) == [[0]]


def test_padded_groups_hold_the_same_targets(tok, tiny_model_dir: Path):
    """Collated in groups, a micro-batch has the same real tokens and labels as collated whole: the loss model
    sums the same token losses and counts the same targets."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    loss_model = CausalLMLoss(model)
    gen = torch.Generator().manual_seed(3)
    examples = [{"input_ids": (ids := torch.randint(3, 200, (n,), generator=gen).tolist()), "labels": ids}
                for n in (5, 40, 7, 38, 6, 90)]
    groups = collate_padded_groups(examples, pad_id(tok), 16)
    assert len(groups) > 1
    assert sum(int(b["attention_mask"].sum()) for b in groups) == real_tokens(examples)
    with torch.no_grad():
        whole_sum, whole_count = loss_model(**collate_padded(examples, pad_id(tok)))
        parts = [loss_model(**b) for b in groups]
    assert sum(int(c) for _, c in parts) == int(whole_count)
    assert float(sum(s for s, _ in parts)) == pytest.approx(float(whole_sum), rel=1e-5)


def test_window_label_tokens_match_what_the_loss_counts(tmp_path: Path, tok, tiny_model_dir: Path):
    """normalize_loss divides by a window's label_tokens; it must be exactly what CausalLMLoss counts."""
    examples = [ex for fmt in ("alpaca", "prompt_completion", "text") for ex in _prepared(tmp_path, tok, fmt)]
    counts = [label_count(ex["labels"]) for ex in examples]
    loss_model = CausalLMLoss(_model(tiny_model_dir, VARLEN_ATTENTION))
    lengths = [len(ex["input_ids"]) for ex in examples]
    windows = plan_epoch(counts, lengths, batch_size=2, grad_accum=2, world_size=1, seed=3, epoch=0)
    assert sorted(j for w in windows for mb in w.micro_batches for j in mb) == list(range(len(examples)))
    with torch.no_grad():
        for window in windows:
            for collate in (collate_packed, lambda exs: collate_padded(exs, pad_id(tok))):
                seen = sum(int(loss_model(**collate([examples[j] for j in mb]))[1]) for mb in window.micro_batches)
                assert seen == window.label_tokens


def test_packed_rows_are_filled_to_a_multiple_without_changing_the_loss(tok, tiny_model_dir: Path):
    """The filler segment rounds the row length up; it carries no labels, attends only to itself, and is not
    counted as trained tokens."""
    from transformers import AutoModelForCausalLM

    data = prepare(str(sample_data_path()), "alpaca", tok, max_seq_len=256, train_on_inputs=False)
    examples = [data.train[i] for i in range(5)]
    filled = collate_packed(examples, pad_token_id=pad_id(tok), multiple=64)
    exact = collate_packed(examples, pad_token_id=pad_id(tok), multiple=1)
    n = real_tokens(examples)
    assert exact["input_ids"].shape[1] == n and filled["input_ids"].shape[1] % 64 == 0
    assert filled["input_ids"].shape[1] - n in range(1, 64) or n % 64 == 0
    assert (filled["labels"][0, n:] == -100).all() and filled["cu_seq_lens"][-2].item() == n
    assert filled["position_ids"][0, n] == 0  # the filler restarts positions: it is its own segment
    register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=VARLEN_ATTENTION)
    loss_model = CausalLMLoss(model).eval()
    with torch.no_grad():
        (s1, c1), (s2, c2) = loss_model(**filled), loss_model(**exact)
    assert int(c1) == int(c2) and torch.allclose(s1, s2, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 4])
def test_math_attention_equals_causal_sdpa(dtype: torch.dtype, groups: int):
    """The CPU math path (padded to the length quantum in bf16, unpadded in fp32; grouped heads stacked, never
    repeated) gives SDPA's causal attention and gradients, on lengths under, at and across the quantum."""
    import torch.nn.functional as F

    from finetune.modeling.ops.attention import _causal_attention_math

    generator = torch.Generator().manual_seed(0)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for n in (5, 32, 37, 70):
        q = torch.randn(1, 4, n, 16, generator=generator)
        k, v = (torch.randn(1, 4 // groups, n, 16, generator=generator) for _ in range(2))
        grad = torch.randn(1, 4, n, 16, generator=generator)
        ours_in = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
        ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]  # the reference in fp32
        ours = _causal_attention_math(*ours_in, 0.0, None)
        ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=groups > 1)
        assert ours.shape == ref.shape and ours.dtype == dtype
        ours.backward(grad.to(dtype))
        ref.backward(grad)
        torch.testing.assert_close(ours.float(), ref, **tol)
        for a, b in zip(ours_in, ref_in):
            torch.testing.assert_close(a.grad.float(), b.grad, **tol)


def test_long_fp32_sequences_take_the_flash_kernel(monkeypatch: pytest.MonkeyPatch):
    """In fp32 the math path keeps a score matrix per head (the square of the length): from 257 tokens on, SDPA's
    flash kernel takes the sequence; in bf16 the math path keeps it up to 1,024."""
    from finetune.modeling.ops import attention

    taken = []
    sdpa = attention._causal_attention_sdpa
    monkeypatch.setattr(attention, "_causal_attention_sdpa", lambda *a: taken.append(a[0].shape[2]) or sdpa(*a))
    for dtype in (torch.float32, torch.bfloat16):
        for n in (256, 257):
            q = k = v = torch.zeros(1, 2, n, 8, dtype=dtype)
            attention._causal_attention_math(q, k, v, 0.0, None)
    assert taken == [257]


def _band(n: int, window: int) -> torch.Tensor:
    """Where each query may look with a sliding window, by transformers' rule (``q - window < k <= q``)."""
    i = torch.arange(n)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


@pytest.mark.parametrize("n", [40, 300])  # the math path, and SDPA's from 257 fp32 tokens on
def test_sliding_window_attention_equals_a_banded_mask(n: int):
    import torch.nn.functional as F

    from finetune.modeling.ops.attention import _causal_attention_math

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, n, 8, generator=generator)
    k, v = (torch.randn(1, 2, n, 8, generator=generator) for _ in range(2))
    ours_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ours = _causal_attention_math(*ours_in, 0.0, None, 7)
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=_band(n, 7), enable_gqa=True)
    grad = torch.randn(ours.shape, generator=generator)
    ours.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
    causal = _causal_attention_math(q, k, v, 0.0, None)
    assert (causal - ours).abs().max() > 1e-3  # the window changed what the queries see


def test_sliding_window_model_packed_equals_transformers_alone():
    """A Qwen2 with a 4-token sliding window on every layer: packed rows through our attention give what
    transformers' own SDPA attention (which builds the banded mask) gives each sequence alone."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    register_varlen_attention()
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    sequences = [torch.randint(4, 64, (n,)) for n in (9, 3, 12)]
    with torch.no_grad():
        alone = _alone(model, sequences)
        model.set_attn_implementation(VARLEN_ATTENTION)
        packed = _packed_inputs(sequences)
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                    cu_seq_lens_q=packed["cu_seq_lens"], use_cache=False).logits[0]
        unpacked = model(input_ids=sequences[2][None], use_cache=False).logits[0]
    torch.testing.assert_close(out, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(unpacked, alone[-12:], atol=ATOL, rtol=0)


def test_attention_the_packed_path_cannot_compute_is_refused():
    from finetune.errors import PackingError
    from finetune.modeling.ops.attention import _varlen_attention

    q = k = v = torch.zeros(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    module = torch.nn.Module()
    with pytest.raises(PackingError, match="soft-capping.*train.packing: auto"):
        _varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, softcap=50.0)
    module.is_causal = False
    with pytest.raises(PackingError, match="bidirectional"):
        _varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu)
    module.is_causal = True
    assert _varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, softcap=None, is_causal=None)[0].shape == (
        1, 6, 2, 8)
