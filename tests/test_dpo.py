"""DPO's arithmetic and data: the first step against TRL's DPOTrainer, log-probabilities against a direct
computation, the reference of a run that continues an adapter, and preference rows (layouts, errors, preview)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.data.formats import IGNORE_INDEX, detect_format, record_segments
from finetune.data.preference import _sequence, encode_pairs, prepare_pairs
from finetune.errors import DataError
from finetune.modeling.ops.loss import fuses_head
from finetune.training.dpo import DpoLoss, attach_reference, collate_pairs

TEXT_ROWS = [
    {"prompt": "Q: Name a color.\nA:", "chosen": " Blue.", "rejected": " I do not know."},
    {"prompt": "Q: What is two plus two?\nA:", "chosen": " Four.", "rejected": " Five, or so."},
    {"prompt": "Q: Say hi.\nA:", "chosen": " Hi there!", "rejected": " No."},
]
CHAT_ROWS = [{"prompt": [{"role": "user", "content": r["prompt"][3:-3]}],
              "chosen": [{"role": "assistant", "content": r["chosen"].strip()}],
              "rejected": [{"role": "assistant", "content": r["rejected"].strip()}]} for r in TEXT_ROWS]
OPENAI_ROWS = [{"input": {"messages": r["prompt"]}, "preferred_output": r["chosen"],
                "non_preferred_output": r["rejected"]} for r in CHAT_ROWS]


class _OneProcess:
    device = torch.device("cpu")
    num_processes = 1


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def _policy(model_dir: Path, fused: bool = True, packed: bool = False):
    """The tiny model with a LoRA adapter whose B is random (seeded), so the policy differs from the reference
    (the base) at the first step; with ``fused``, through the training's rewritten paths; ``packed``: with the
    packed attention, for packed rows."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.modeling.ops import rewrite_for_training
    from finetune.modeling.ops.attention import VARLEN_ATTENTION, register_varlen_attention

    register_varlen_attention()
    attn = {"attn_implementation": VARLEN_ATTENTION} if packed else {}
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **attn)
    model = get_peft_model(base, _lora_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    if fused:
        rewrite_for_training(model, "fp32", torch.device("cpu"))
    model.train()
    return model


def _examples(rows: list[dict], tokenizer) -> list[dict]:
    out = []
    for pair in encode_pairs(rows, tokenizer, lambda j: f"row {j}"):
        ex = {}
        for side in ("chosen", "rejected"):
            ex[f"{side}_ids"], ex[f"{side}_labels"] = _sequence(pair["prompt"], pair[side], 10**6)
        out.append(ex)
    return out


def _ours(model_dir: Path, rows: list[dict], beta: float, loss: str) -> tuple[float, dict, dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = _policy(model_dir)
    dpo = DpoLoss(model, beta, loss)
    (batch,) = collate_pairs(_examples(rows, tok), tok.pad_token_id)
    loss_sum, pairs = dpo(**batch)
    value = loss_sum / pairs
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(value.detach()), dpo.take_stats(_OneProcess()), grads


def _trl(model_dir: Path, rows: list[dict], beta: float, loss: str, tmp: Path) -> tuple[float, dict, dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(tmp), beta=beta, loss_type=[loss], per_device_train_batch_size=len(rows),
                     report_to=[], use_cpu=True, max_length=None, bf16=False, fp16=False)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=_lora_config())
    model = trainer.model
    same = _policy(model_dir, fused=False).state_dict()  # the same adapter weights as ours
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(same[name])
    model.train()
    value = trainer.compute_loss(model, next(iter(trainer.get_train_dataloader())))
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    return float(value.detach()), metrics, grads


# TRL's own config reads transformers' deprecated names (their warnings are TRL's to fix, not ours)
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("rows, loss", [(TEXT_ROWS, "sigmoid"), (CHAT_ROWS, "sigmoid"), (TEXT_ROWS, "hinge")],
                         ids=["text-sigmoid", "chat-sigmoid", "text-hinge"])
def test_first_step_loss_rewards_and_gradients_equal_trls(rows, loss, tiny_model_dir: Path, tmp_path: Path):
    pytest.importorskip("trl")
    ours, stats, grads = _ours(tiny_model_dir, rows, 0.1, loss)
    theirs, metrics, their_grads = _trl(tiny_model_dir, rows, 0.1, loss, tmp_path)
    # fp32 sums over a few dozen tokens of log-probs of order 10: agreement to ~1e-6 relative
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert ours != pytest.approx(math.log(2), abs=1e-3)  # the policy is not the reference: a real comparison
    assert stats["reward_chosen"] == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert stats["reward_rejected"] == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert stats["reward_margin"] == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert stats["reward_accuracy"] == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)
    assert set(grads) == set(their_grads) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6)


def test_openai_rows_encode_as_the_conversational_layout(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert encode_pairs(OPENAI_ROWS, tok, str) == encode_pairs(CHAT_ROWS, tok, str)
    text = encode_pairs(TEXT_ROWS, tok, str)[0]
    assert text["chosen"][-1] == tok.eos_token_id and text["prompt"][0] == tok.bos_token_id


def _direct_logps(model, ids: list[int], labels: list[int]) -> float:
    """log p of the labelled tokens of one unpadded sequence, from the model's own logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    mask = torch.tensor([t != IGNORE_INDEX for t in labels[1:]])
    return float(logps[mask].sum())


def test_sequence_logps_of_a_padded_batch_equal_a_direct_computation(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _policy(tiny_model_dir)
    assert fuses_head(model.get_output_embeddings())  # the fused per-row log-softmax (ops.loss._HeadLogProbs)
    examples = _examples(TEXT_ROWS, tok)
    (batch,) = collate_pairs(examples, tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padded: the rows have different lengths
    with torch.no_grad():
        sums, counts = DpoLoss(model, 0.1).sequence_logps(**batch)
    rows = [(ex[f"{side}_ids"], ex[f"{side}_labels"]) for side in ("chosen", "rejected") for ex in examples]
    for k, (ids, labels) in enumerate(rows):
        assert float(sums[k]) == pytest.approx(_direct_logps(model, ids, labels), rel=1e-5)
        assert int(counts[k]) == sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def test_pairs_in_groups_of_similar_lengths_give_the_one_batch_loss_rewards_and_gradients(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = TEXT_ROWS + [{"prompt": "Q: Tell a long story.\nA:", "chosen": " Once upon a time " * 12,
                         "rejected": " Once upon a time."}]
    examples = _examples(rows, tok)
    results = []
    for call_cost in (None, 1):
        model = _policy(tiny_model_dir)
        dpo = DpoLoss(model, 0.1)
        batches = collate_pairs(examples, tok.pad_token_id, call_cost)
        total = 0.0
        for batch in batches:  # as the training loop does: a backward per batch, normalised by the step's pairs
            loss_sum, _ = dpo(**batch)
            (loss_sum / len(rows)).backward()
            total += float(loss_sum.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((len(batches), total, dpo.take_stats(_OneProcess()), grads))
    (whole, loss, stats, grads), (split, loss_split, stats_split, grads_split) = results
    assert whole == 1 and split > 1  # the long pair goes alone
    assert loss_split == pytest.approx(loss, rel=1e-5)
    assert stats_split == pytest.approx(stats, rel=1e-5, abs=1e-6)
    assert grads_split.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_split[name], grad, rtol=1e-4, atol=1e-6)


def test_sft_weight_adds_the_chosen_answers_mean_token_nll(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _policy(tiny_model_dir)
    (batch,) = collate_pairs(_examples(TEXT_ROWS, tok), tok.pad_token_id)
    plain = DpoLoss(model, 0.1)
    with torch.no_grad():
        base_sum, _ = plain(**batch)
        weighted, _ = DpoLoss(model, 0.1, sft_weight=0.5)(**batch)
        sums, counts = plain.sequence_logps(**batch)
    nll = (-sums[:3] / counts[:3]).sum()
    assert float(weighted) == pytest.approx(float(base_sum + 0.5 * nll), rel=1e-6)


def test_a_run_continuing_an_adapter_uses_that_adapter_frozen_as_its_reference(tiny_model_dir: Path,
                                                                                   tmp_path: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    _policy(tiny_model_dir, fused=False).save_pretrained(tmp_path / "parent")  # a parent far from the base
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "parent"), is_trainable=True)  # as attach_lora does
    reference = attach_reference(model, str(tmp_path / "parent"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    dpo = DpoLoss(model, 0.1, reference=reference)
    (batch,) = collate_pairs(_examples(TEXT_ROWS, tok), tok.pad_token_id)
    loss_sum, pairs = dpo(**batch)
    # policy == reference at the start: log 2 exactly, although the parent is far from the base
    assert float(loss_sum.detach() / pairs) == pytest.approx(math.log(2), abs=1e-6)
    assert dpo.take_stats(_OneProcess())["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # unchanged by the switch
    assert model.active_adapter == "default"
    model.save_pretrained(tmp_path / "out", selected_adapters=["default"])
    assert not (tmp_path / "out" / "reference").exists()


# ---------------------------------------------------------------------------------------------- rows


def test_preference_layouts_are_detected_and_previewed(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    assert detect_format(["prompt", "chosen", "rejected"]) == "preference"
    assert detect_format(["input", "preferred_output", "non_preferred_output"]) == "preference"
    pieces = record_segments(TEXT_ROWS[0], "auto")
    assert pieces[0] == (TEXT_ROWS[0]["prompt"], False) and pieces[1] == (" Blue.", True)
    assert pieces[-1] == (" I do not know.", False)
    chat = record_segments(OPENAI_ROWS[0], "auto", AutoTokenizer.from_pretrained(tiny_model_dir))
    assert chat[1][1] and "Blue." in chat[1][0] and "I do not know." in chat[-1][0]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Q", "chosen": " same", "rejected": " same"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "Q", "chosen": " yes"}, "field 'rejected' is missing"),
    ({"prompt": "Q", "chosen": " yes", "rejected": ""}, "field 'rejected' is missing, null or empty"),
    ({"input": {"messages": [{"role": "user", "content": "Q"}]}, "preferred_output": [{"role": "assistant",
      "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "a"}]},
     "'preferred_output' and 'non_preferred_output' are identical"),
    ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"}, "mix text and message"),
    (CHAT_ROWS[0], "a conversation row in a file whose first row is a text"),
], ids=["identical", "missing", "empty", "openai-identical", "mixed", "text-then-chat"])
def test_a_bad_row_is_an_error_naming_its_file_and_line(bad, message, tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    rows = TEXT_ROWS + [bad] if "prompt" in bad else OPENAI_ROWS + [bad]
    data = _write(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as err:
        prepare_pairs(str(data), AutoTokenizer.from_pretrained(tiny_model_dir), max_seq_len=64)
    assert f"prefs.jsonl:{len(rows)}: " in str(err.value) and message in str(err.value)


def test_supervised_rows_are_refused_for_dpo_and_pairs_for_sft(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from finetune.data.prepare import prepare

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "Q", "completion": " A"}] * 3)
    with pytest.raises(DataError, match="train.method dpo needs preference rows"):
        prepare_pairs(str(sft), tok, max_seq_len=64)
    pairs = _write(tmp_path / "pairs.jsonl", TEXT_ROWS)
    with pytest.raises(DataError, match=r"pairs.jsonl:1: preference rows .* train with train.method: dpo"):
        prepare(str(pairs), "auto", tok, max_seq_len=64, train_on_inputs=False)


def test_pairs_are_split_truncated_and_described(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = _write(tmp_path / "prefs.jsonl", TEXT_ROWS * 4)
    prepared = prepare_pairs(str(data), tok, max_seq_len=14, eval=0.25, seed=1)
    info = prepared.info
    assert (info["train_rows"], info["eval_rows"], info["format"]) == (9, 3, "prompt_completion")
    assert info["preference"] == "prompt/chosen/rejected" and info["truncated"] > 0
    for row in prepared.train:
        assert len(row["chosen_ids"]) <= 14 and len(row["rejected_ids"]) <= 14
        assert row["length"] == len(row["chosen_ids"]) + len(row["rejected_ids"])
    chat = prepare_pairs(str(_write(tmp_path / "chat.jsonl", OPENAI_ROWS)), tok, max_seq_len=64)
    assert chat.info["format"] == "messages" and chat.info["preference"] == "openai"
    with pytest.raises(DataError, match="no training pairs left"):
        prepare_pairs(str(data), tok, max_seq_len=5)
    with pytest.raises(DataError, match=r"prefs.jsonl:\d+: \d+ tokens, longer than max_seq_len 14"):
        prepare_pairs(str(data), tok, max_seq_len=14, overlong="error")


def test_dpo_config_defaults_and_refusals():
    from finetune.config import config_from_dict
    from finetune.errors import ConfigError

    base = {"base_model": "x/y", "data": {"path": "d.jsonl"}}
    cfg = config_from_dict({**base, "train": {"method": "dpo"}})
    assert (cfg.train.method, cfg.dpo.beta, cfg.dpo.loss, cfg.dpo.sft_weight) == ("dpo", 0.1, "sigmoid", 0.0)
    assert config_from_dict(base).train.method == "sft"
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, "train": {"method": "dpo"}, "lora": {"init": "pissa"},
                          "dpo": {"beta": 0, "loss": "ipo"}})
    text = str(err.value)
    assert config_from_dict({**base, "train": {"method": "dpo", "packing": True}}).train.packing is True
    for expected in ("lora.init: pissa changes the base weights",
                     "dpo.beta: must be > 0", "dpo.loss: must be one of sigmoid, hinge"):
        assert expected in text
    with pytest.raises(ConfigError, match="data.format: preference rows train with train.method: dpo"):
        config_from_dict({**base, "data": {"path": "d.jsonl", "format": "preference"}})
    with pytest.raises(ConfigError, match="data.format: dpo trains on preference rows"):
        config_from_dict({**base, "data": {"path": "d.jsonl", "format": "alpaca"}, "train": {"method": "dpo"}})
    with pytest.raises(ConfigError, match="did you mean 'train.method'"):
        config_from_dict({**base, "train": {"methd": "dpo"}})


def test_dpo_losses_match_their_definitions():
    from finetune.training.dpo import dpo_losses

    c, r, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    d = (c - rc) - (r - rr)  # 1.5
    assert float(dpo_losses(c, r, rc, rr, 0.1, "sigmoid")) == pytest.approx(float(-F.logsigmoid(0.1 * d)))
    assert float(dpo_losses(c, r, rc, rr, 0.1, "hinge")) == pytest.approx(1 - 0.15)


def test_the_data_preview_shows_pairs_and_the_form_keeps_dpo_settings(tmp_path: Path):
    from finetune.web.preview import preview_data
    from finetune.web.train_form import changed_settings

    data = _write(tmp_path / "prefs.jsonl", TEXT_ROWS + [{"prompt": "Q", "chosen": " a", "rejected": " a"}])
    p = preview_data(str(data))
    assert (p.format, p.rows, p.error) == ("preference", 4, None) and "dpo" in p.note
    assert p.examples[0][:2] == [(TEXT_ROWS[0]["prompt"], False), (" Blue.", True)]
    assert p.examples[0][-1] == (" I do not know.", False)
    assert "identical" in preview_data(str(data), limit=4).error
    config = {"train": {"method": "dpo", "lr": 2e-4}, "dpo": {"beta": 0.1, "loss": "sigmoid", "sft_weight": 0.5}}
    assert changed_settings(config) == {"train.method": "dpo", "dpo.sft_weight": 0.5}


def test_the_api_takes_the_method_and_dpo_settings_in_the_training_input(tiny_model_dir: Path, tmp_path: Path,
                                                                          fake_executor):
    from service import running_server

    from finetune.registry import Registry
    from finetune.registry.jobs import Trainings
    from finetune.registry.sources import import_base
    from finetune.server.settings import ServerSettings

    (tmp_path / "data").mkdir()
    data = _write(tmp_path / "data" / "prefs.jsonl", TEXT_ROWS)
    reg = Registry(tmp_path / "registry")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        base = import_base(reg, "base/x", str(tiny_model_dir), visibility="public")
    settings = ServerSettings(workers=1, allowed_data_dirs=(data.parent.resolve(),))
    with running_server(reg, settings) as server:
        http = server.http("alice")
        assert http.post("/v1/models", json={"owner": "alice", "name": "p", "visibility": "private",
                                             "hardware": "cpu"}).status_code == 201
        url = f"/v1/models/base/x/versions/{base.id}/trainings"
        ok = http.post(url, json={"destination": "alice/p", "input": {
            "data": {"path": str(data)}, "train.method": "dpo", "train.max_steps": 2, "dpo": {"beta": 0.2}}})
        assert ok.status_code == 201, ok.text
        record = Trainings(reg).get(ok.json()["id"])
        assert record.input["train"]["method"] == "dpo" and record.input["dpo"]["beta"] == 0.2
        bad = http.post(url, json={"destination": "alice/p", "input": {
            "data": {"path": str(data)}, "train.method": "ppo", "dpo.loss": "ipo"}})
        assert bad.status_code == 422, bad.text
        detail = bad.json()["detail"]
        assert "train.method: must be one of sft, dpo" in detail and "dpo.loss: must be one of sigmoid, hinge" in detail


@pytest.mark.parametrize("variant", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"use_rslora": True}],
                         ids=["dora", "modules_to_save", "rslora"])
def test_the_reference_of_a_variant_adapter_is_the_base(variant, tiny_model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.modeling.ops import rewrite_for_training

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (batch,) = collate_pairs(_examples(TEXT_ROWS, tok), tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected, _ = DpoLoss(base, 0.1).sequence_logps(**batch)  # the plain base, no peft at all
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                            ensure_weight_tying="modules_to_save" in variant, **variant))
    rewrite_for_training(model, "fp32", torch.device("cpu"))
    dpo = DpoLoss(model, 0.1)
    loss_sum, pairs = dpo(**batch)
    assert float(loss_sum.detach() / pairs) == pytest.approx(math.log(2), abs=1e-6)  # starts at the reference
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # the policy moves away
        moved, _ = dpo.sequence_logps(**batch)
        with model.disable_adapter():
            reference, _ = dpo.sequence_logps(**batch)
    assert (moved - expected).abs().max() > 1e-3
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-5)
