"""DPO on packed rows: the same loss, rewards and adapter gradients as padded batches (from a base and from an
adapter version, whose frozen copy is the reference), and a base that cannot pack trains its pairs padded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_dpo import TEXT_ROWS, _examples, _OneProcess, _policy

from finetune.training.dpo import DpoLoss, attach_reference, collate_pairs

ROWS = TEXT_ROWS + [{"prompt": "Q: Tell a long story.\nA:", "chosen": " Once upon a time " * 12,
                     "rejected": " Once upon a time."}]


def _continued(model_dir: Path, parent: Path, packed: bool):
    """A run continuing ``parent``: its adapter trainable, a frozen copy as the reference, and the trained one
    moved away from it (seeded) so that the policy is not the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.modeling.ops import rewrite_for_training
    from finetune.modeling.ops.attention import VARLEN_ATTENTION

    attn = {"attn_implementation": VARLEN_ATTENTION} if packed else {}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **attn)
    model = PeftModel.from_pretrained(base, str(parent), is_trainable=True)  # as attach_lora does
    reference = attach_reference(model, str(parent))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    rewrite_for_training(model, "fp32", torch.device("cpu"))
    model.train()
    return model, reference


def _step(model, reference: str | None, examples: list[dict], pad: int, packed: bool, row_tokens: int | None = None):
    """One step as the training loop takes it: a backward per batch, normalised by the step's pairs."""
    dpo = DpoLoss(model, 0.1, sft_weight=0.5, reference=reference)
    batches = collate_pairs(examples, pad, call_cost=None, packed=packed, row_tokens=row_tokens)
    total = 0.0
    for batch in batches:
        loss_sum, _ = dpo(**batch)
        (loss_sum / len(examples)).backward()
        total += float(loss_sum.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return batches, total / len(examples), dpo.take_stats(_OneProcess()), grads


@pytest.mark.parametrize("continued", [False, True], ids=["from-a-base", "from-an-adapter"])
def test_packed_pairs_give_the_padded_loss_rewards_and_gradients(continued: bool, tiny_model_dir: Path,
                                                                 tmp_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = _examples(ROWS, tok)
    if continued:
        _policy(tiny_model_dir, fused=False).save_pretrained(tmp_path / "parent")
    # the longest pair alone passes the bound: it goes into a second row
    bound = sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples[:3])
    results = []
    for packed, row_tokens in ((False, None), (True, None), (True, bound)):
        model, reference = _continued(tiny_model_dir, tmp_path / "parent", packed) if continued else \
            (_policy(tiny_model_dir, packed=packed), None)
        results.append(_step(model, reference, examples, tok.pad_token_id, packed, row_tokens))
    (padded, loss, stats, grads), (packed_batches, loss_packed, stats_packed, grads_packed), bounded = results
    assert [len(b["cu_seq_lens"]) - 1 for b in bounded[0]] == [2 * 3 + 1, 2 + 1]  # whole pairs, each with filler
    (row,) = packed_batches
    sequences = [len(ex[f"{side}_ids"]) for side in ("chosen", "rejected") for ex in examples]
    assert row["input_ids"].shape == (1, row["cu_seq_lens"][-1]) and "attention_mask" not in row
    assert row["cu_seq_lens"].diff()[:len(sequences)].tolist() == sequences  # chosen ones, then rejected ones
    assert len(row["cu_seq_lens"]) == len(sequences) + 2  # a filler segment closes the row: it counts for nothing
    assert row["input_ids"].numel() < padded[0]["input_ids"].numel()  # no padding (the row's filler aside)
    assert loss != pytest.approx(math.log(2), abs=1e-3)  # the policy is not the reference: a real comparison
    # fp32 sums over a few dozen tokens of log-probs of order 10, the attention computed another way
    assert loss_packed == pytest.approx(loss, rel=1e-5)
    assert stats_packed == pytest.approx(stats, rel=1e-5, abs=1e-5)  # rewards: beta x a difference of such sums
    assert grads_packed.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-6)
    _, loss_bounded, stats_bounded, grads_bounded = bounded  # two rows: the same figures again
    assert loss_bounded == pytest.approx(loss, rel=1e-5)
    assert stats_bounded == pytest.approx(stats, rel=1e-5, abs=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_bounded[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_base_that_cannot_pack_trains_its_pairs_padded(tiny_model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys):
    """StableLM runs its own attention over the whole row: with ``packing: auto`` dpo trains it on padded pairs,
    and the log says so and why."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finetune.cli import main
    from finetune.registry import Registry
    from finetune.registry.jobs import Trainings

    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = tmp_path / "stablelm"
    config = AutoConfig.for_model("stablelm", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(yaml.safe_dump({
        "base_model": str(base), "data": {"path": str(data), "max_seq_len": 64}, "lora": {"r": 4, "alpha": 8},
        "train": {"method": "dpo", "max_steps": 1, "batch_size": 2, "precision": "fp32"}}))
    root = tmp_path / "registry"
    rc = main(["--registry", str(root), "train", str(cfg), "--destination", "alice/p", "--create-destination",
               "--quiet"])
    assert rc == 0, capsys.readouterr().err
    reg = Registry(root)
    record = Trainings(reg).get(reg.resolve("alice/p:1").metadata["training_id"])
    assert record.metrics["packing"] is False and record.metrics["method"] == "dpo"
    log = Trainings(reg).paths(record.id).log.read_text()
    assert "packing off: packed attention (finetune_varlen) cannot train StableLmForCausalLM" in log
    assert "pairs in padded batches" in log
