"""Exporting versions (the PEFT adapter, or merged into a plain Hugging Face model) and comparing versions
(config changes, eval loss on shared token ids, answers side by side)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_one_line_error, snapshot

import finetune
import finetune.data.prepare as preparing
from finetune.cli import main
from finetune.compare import compare_versions, config_changes
from finetune.config import config_from_dict
from finetune.data import formats
from finetune.errors import AlreadyExistsError, UsageError
from finetune.export import export
from finetune.inference import GenerationSettings, generate, load_version
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.tiny import load_sample_records, sample_data_path
from finetune.training import train

BASE = "local/tiny:1"


@pytest.fixture(scope="module")
def built(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """local/tiny:1, a second copy of it (local/other:1), alice/m:1 and alice/m:2 (another lr, 40 rows of data)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        root = tmp_path_factory.mktemp("export")
        reg = Registry(root / "registry")
        import_base(reg, "local/tiny", str(tiny_model_dir))
        import_base(reg, "local/other", str(tiny_model_dir))
        subset = root / "subset.jsonl"
        subset.write_text("".join(json.dumps(r) + "\n" for r in load_sample_records()[:40]))
        versions = {}
        for name, path, lr in (("v1", sample_data_path(), 5e-3), ("v2", subset, 1e-2)):
            cfg = config_from_dict({"base_model": BASE, "data": {"path": str(path), "max_seq_len": 256},
                                    "train": {"max_steps": 3, "batch_size": 8, "lr": lr}})
            versions[name] = train(cfg, registry=reg, destination="alice/m", create_destination=True,
                                          progress=False).version
        yield {"root": root, "reg": reg, **versions}


def cli(capsys: pytest.CaptureFixture[str], reg: Registry, *argv: str) -> tuple[int, str, str]:
    rc = main(["--registry", str(reg.root), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------- export


def test_export_adapter_copies_the_peft_folder(built: dict, tmp_path: Path, capsys):
    out = tmp_path / "adapter"
    rc, stdout, _ = cli(capsys, built["reg"], "export", "alice/m:1", str(out), "--format", "adapter")
    assert rc == 0 and stdout.strip() == str(out)
    v1 = built["v1"]
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "loss.png"]
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (v1.path / name).read_bytes()
        assert os.access(out / name, os.W_OK)  # the user's copy, not a read-only registry file
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging folder left behind


def test_export_merged_loads_without_peft_and_matches_the_adapter(built: dict, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(built["reg"], "alice/m:1", tmp_path / "merged", format="merged")
    assert not (out / "adapter_config.json").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(out))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    peft_model, peft_tokenizer = finetune.load("alice/m:1", registry=built["reg"], merge=False)
    base, _ = finetune.load(BASE, registry=built["reg"])
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float32
    text = "Below is an instruction. Name a color.\n\n### Response:\n"
    assert tokenizer(text)["input_ids"] == peft_tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        a, b, c = merged(ids).logits, peft_model(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapter is in the merged weights
    assert "alice/m:1" in (out / "README.md").read_text()


def test_export_refuses_a_non_empty_folder_and_accepts_an_empty_one(built: dict, tmp_path: Path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    rc, _, err = cli(capsys, built["reg"], "export", "alice/m:1", str(full))
    assert_one_line_error(rc, err, str(full), "not an empty folder")
    assert os.listdir(full) == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(built["reg"], "alice/m:1", empty) == empty and (empty / "adapter_config.json").is_file()


def test_export_into_the_registry_is_refused(built: dict, tmp_path: Path, capsys):
    reg = built["reg"]
    link = tmp_path / "link-to-registry"
    link.symlink_to(reg.root)
    before = snapshot(reg.root)
    for target in (reg.root / "models/alice/m/versions/99", reg.root / "exports", reg.root, link / "x"):
        rc, _, err = cli(capsys, reg, "export", "alice/m:1", str(target), "--format", "adapter")
        assert_one_line_error(rc, err, "is inside the registry", "outside the registry")
        assert rc == 2
    assert snapshot(reg.root) == before
    assert [v.number for v in reg.list_versions("alice/m")] == [2, 1]


def test_export_adapter_of_a_base_version_is_refused(built: dict, tmp_path: Path):
    with pytest.raises(UsageError, match="no adapter"):
        export(built["reg"], BASE, tmp_path / "x", format="adapter")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------- compare


def test_config_changes_are_dotted_keys():
    a = {"train": {"lr": 1e-3, "seed": 1}, "data": {"path": "a.jsonl"}}
    b = {"train": {"lr": 2e-3, "seed": 1}, "data": {"path": "a.jsonl", "eval": 0.1}}
    assert config_changes(a, b) == {"data.eval": (None, 0.1), "train.lr": (1e-3, 2e-3)}
    assert config_changes(a, a) == {}


def test_compare_encodes_the_eval_file_once_and_scores_every_version(built: dict, tmp_path: Path, monkeypatch):
    reg = built["reg"]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in load_sample_records()[40:52]))
    calls = []
    real_prepare = preparing.prepare
    monkeypatch.setattr(preparing, "prepare", lambda *a, **k: calls.append(a) or real_prepare(*a, **k))
    seen = []  # (versions done, eval losses known at that moment): progress as each version is scored
    result = compare_versions(reg, ["alice/m:1", "alice/m:2", BASE], eval_file=str(eval_file),
                              on_version=lambda c, done: seen.append(
                                  (done, [v["eval_loss"] is not None for v in c.to_dict()["versions"]])))
    assert seen == [(1, [True, False, False]), (2, [True, True, False]), (3, [True, True, True])]
    assert len(calls) == 1  # one encoding, reused for all three
    losses = [r.eval_loss for r in result.reports]
    assert all(isinstance(x, float) and x > 0 for x in losses) and len(set(losses)) == 3
    assert result.eval_rows == 12

    # The loss is the plain token cross-entropy of the completion tokens, averaged over all of them.
    loaded = load_version(reg, "alice/m:2")
    total = count = 0.0
    for record in load_sample_records()[40:52]:
        ids, labels = formats.encode_record(record, "alpaca", loaded.tokenizer, train_on_inputs=False)
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(labels[1:])
        total += float(F.cross_entropy(logits, targets, ignore_index=formats.IGNORE_INDEX, reduction="sum"))
        count += int((targets != formats.IGNORE_INDEX).sum())
    assert losses[1] == pytest.approx(total / count, rel=1e-4)
    assert result.eval_label_tokens == count


def test_compare_refuses_eval_loss_across_bases(built: dict, tmp_path: Path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps(load_sample_records()[0]) + "\n")
    with pytest.raises(UsageError, match="local/other:1"):
        compare_versions(built["reg"], ["alice/m:1", "local/other:1"], eval_file=str(eval_file))
    # Without an eval file, versions of different bases compare fine.
    assert len(compare_versions(built["reg"], ["alice/m:1", "local/other:1"]).reports) == 2


def test_compare_cli_prints_the_table_and_answers_side_by_side(built: dict, tmp_path: Path, capsys):
    reg = built["reg"]
    prompts = tmp_path / "prompts.jsonl"
    rows = ({"prompt": "Name a color."}, {"instruction": "Add 2 and 3."})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = cli(capsys, reg, "versions", "compare", "alice/m:1", "alice/m:2", "--prompts", str(prompts),
                       "--max-new-tokens", "6")
    assert rc == 0, err
    header, first, second = out.splitlines()[:3]
    assert "CONFIG CHANGES vs alice/m:1" in header
    assert first.startswith("alice/m:1") and "(reference)" in first and BASE in first
    assert second.startswith("alice/m:2") and "train.lr: 0.005 -> 0.01" in second and "data.path" in second
    assert "subset.jsonl (40 rows" in second and "quickstart.jsonl (70 rows" in first
    settings = GenerationSettings(max_new_tokens=6)
    for ref in ("alice/m:1", "alice/m:2"):
        loaded = load_version(reg, ref)
        for prompt in ("Name a color.", "Add 2 and 3."):
            answer = generate(loaded, prompt, settings).replace("\n", "\\n")
            assert f"  {ref}  {answer}" in out.splitlines()

    rc, out, _ = cli(capsys, reg, "versions", "compare", BASE, "alice/m:1", "alice/m:2")
    assert rc == 0 and "(no training config)" in out.splitlines()[1] and "(reference)" in out.splitlines()[2]
    rc, out, _ = cli(capsys, reg, "versions", "compare", "alice/m:1", "alice/m:2", "--json")
    report = json.loads(out)
    assert [v["ref"] for v in report["versions"]] == ["alice/m:1", "alice/m:2"]
    assert report["versions"][1]["config_changes"]["train.lr"] == {"from": 0.005, "to": 0.01}


def test_compare_needs_two_versions(built: dict, capsys):
    rc, _, err = cli(capsys, built["reg"], "versions", "compare", "alice/m:1")
    assert_one_line_error(rc, err, "at least two")
    rc, _, err = cli(capsys, built["reg"], "versions", "compare", "alice/m:1", "alice/zz:1")
    assert_one_line_error(rc, err, "alice/zz", "not found")


def test_already_exists_error_is_raised_by_the_api(built: dict, tmp_path: Path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(AlreadyExistsError):
        export(built["reg"], "alice/m:1", tmp_path / "f")
