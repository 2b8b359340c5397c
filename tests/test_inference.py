"""Using versions: finetune.load, predict and chat (CLI and API), continuing training from a version, the lineage
account, the model card, and the errors for unknown refs, damaged adapters and missing bases.

One registry per module holds a tiny base, an alpaca fine-tune, a chat fine-tune and two continuations of the
alpaca one; tests that damage something work on a copy of it.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error
from safetensors.torch import load_file

import finetune
from finetune import atomic, inference, training
from finetune.cli import main
from finetune.config import config_from_dict
from finetune.data import formats
from finetune.errors import IntegrityError, ModelLoadError, UsageError
from finetune.inference import GenerationSettings, Prompt, generate, load_version, resolve_device
from finetune.registry import Registry
from finetune.registry.lineage import lineage
from finetune.registry.sources import folder_sha256, import_base
from finetune.tiny import load_sample_records, sample_data_path

BASE = "local/tiny:1"
SETTINGS = GenerationSettings(max_new_tokens=8)


def train(reg: Registry, base: str, destination: str, data_path: Path | None = None, fmt: str = "auto",
          **train: object):
    cfg = config_from_dict({
        "base_model": base,
        "data": {"path": str(data_path or sample_data_path()), "format": fmt, "max_seq_len": 256},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 5e-3, **train},
    })
    return training.train(cfg, registry=reg, destination=destination, create_destination=True, progress=False).version


@pytest.fixture(scope="module")
def built(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The shared registry: base, alpaca fine-tune (alice/m:1), chat fine-tune, a continuation and a fork."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        root = tmp_path_factory.mktemp("inference")
        reg = Registry(root / "registry")
        import_base(reg, "local/tiny", str(tiny_model_dir))
        v1 = train(reg, BASE, "alice/m")
        chats = root / "chat.jsonl"
        chats.write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}) + "\n"
            for r in load_sample_records()[:16]))
        chat = train(reg, BASE, "alice/chat", chats, max_steps=2)
        # lr 1e-12: the continued adapter must come out equal to the one it started from.
        fork = train(reg, v1.ref, "bob/fork", max_steps=1, lr=1e-12)
        v2 = train(reg, v1.ref, "alice/m", max_steps=2)
        yield {"root": root, "reg": reg, "v1": v1, "v2": v2, "fork": fork, "chat": chat}


@pytest.fixture
def damaged_copy(built: dict, tmp_path: Path) -> Registry:
    """A private copy of the shared registry, free to break."""
    shutil.copytree(built["reg"].root, tmp_path / "registry", symlinks=True)
    return Registry(tmp_path / "registry")


def cli(capsys: pytest.CaptureFixture[str], reg: Registry, *argv: str, stdin: str | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    if stdin is not None:
        import io

        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(["--registry", str(reg.root), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def writable(path: Path) -> None:
    for p in [path, *path.parents]:
        if p.exists() and not p.stat().st_mode & stat.S_IWUSR:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


# ------------------------------------------------------------------------------------------- load


def test_import_finetune_does_not_import_torch():
    code = ("import sys, finetune; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(finetune.load); assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_load_merges_the_adapter_into_a_plain_model(built: dict):
    reg = built["reg"]
    merged, tok = finetune.load("alice/m:1", registry=reg)
    unmerged, _ = finetune.load("alice/m:1", registry=reg, merge=False)
    base, _ = finetune.load(BASE, registry=reg)
    from peft import PeftModel

    assert not isinstance(merged, PeftModel) and isinstance(unmerged, PeftModel)
    assert not merged.training and not unmerged.training
    assert next(merged.parameters()).dtype == torch.float32  # fp32 on the CPU unless asked
    ids = torch.tensor([tok("Name a color.")["input_ids"]])
    with torch.no_grad():
        a, b, c = merged(ids).logits, unmerged(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapter was applied


def test_device_and_precision_rules():
    assert resolve_device("auto", "cpu") == torch.device("cpu")
    assert resolve_device("cpu", "gpu") == torch.device("cpu")
    assert inference.inference_precision("auto", torch.device("cpu")) == "fp32"
    assert inference.inference_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto", "auto") == torch.device("cpu")
        with pytest.raises(ModelLoadError, match="hardware setting is gpu"):
            resolve_device("auto", "gpu")
        with pytest.raises(ModelLoadError, match="no GPU"):
            resolve_device("gpu")


# ------------------------------------------------------------------------------------------- predict


def test_predict_formats_the_prompt_as_training_did(built: dict, capsys):
    reg = built["reg"]
    loaded = load_version(reg, "alice/m:1")
    assert loaded.prompt_format == "alpaca"
    ids = inference.prompt_ids(loaded, "Name a color.")
    train_ids, labels = formats.encode_record({"instruction": "Name a color.", "input": "", "output": "red"}, "alpaca",
                                           loaded.tokenizer, train_on_inputs=False)
    prompt_len = labels.index(next(t for t in labels if t != formats.IGNORE_INDEX))
    assert ids == train_ids[:prompt_len]  # exactly the tokens training put before the completion

    # The CLI prints only the completion: greedy generate on those ids, new tokens only, up to eos.
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    eos = loaded.tokenizer.eos_token_id
    expected = loaded.tokenizer.decode(out[: out.index(eos)] if eos in out else out, skip_special_tokens=True)
    rc, stdout, _ = cli(capsys, reg, "predict", "alice/m:1", "Name a color.", "--max-new-tokens", "8")
    assert rc == 0 and stdout == expected + "\n"
    assert cli(capsys, reg, "predict", "alice/m:1", "Name a color.", "--max-new-tokens", "8")[1] == stdout


def test_sampling_repeats_with_a_seed(built: dict):
    loaded = load_version(built["reg"], "alice/m:1")
    hot = GenerationSettings(max_new_tokens=12, temperature=1.5, seed=7)
    first = generate(loaded, "Name a color.", hot)
    assert generate(loaded, "Name a color.", hot) == first
    others = {generate(loaded, "Name a color.", GenerationSettings(max_new_tokens=12, temperature=1.5, seed=s))
              for s in range(4)}
    assert len(others | {first}) > 1  # a seed changes the draw


def test_generation_stops_at_eos_and_returns_only_new_tokens(built: dict, monkeypatch):
    from types import SimpleNamespace

    loaded = load_version(built["reg"], "alice/m:1")
    eos = loaded.tokenizer.eos_token_id
    script = iter([40, 41, eos, 42])  # the model's next token at each step

    def forward(input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, loaded.model.config.vocab_size)
        logits[..., next(script)] = 1.0
        return SimpleNamespace(logits=logits)

    monkeypatch.setattr(loaded.model, "forward", forward)
    assert inference.generate_ids(loaded, [1, 2, 3], SETTINGS) == [40, 41]


def test_predict_file_writes_one_jsonl_line_per_prompt(built: dict, capsys, tmp_path: Path):
    reg = built["reg"]
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"instruction": "Name a color."}, {"instruction": "Add the numbers.", "input": "2 and 3"},
            {"prompt": "Name a color."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    rc, out, _ = cli(capsys, reg, "predict", "alice/m:1", "--file", str(prompts), "--max-new-tokens", "8")
    assert rc == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [{k: v for k, v in line.items() if k != "completion"} for line in lines] == rows
    loaded = load_version(reg, "alice/m:1")
    single = generate(loaded, "Name a color.", SETTINGS)
    with_input = generate(loaded, Prompt(formats.alpaca_prompt("Add the numbers.", "2 and 3"), rendered=True), SETTINGS)
    assert [line["completion"] for line in lines] == [single, with_input, single]


# ------------------------------------------------------------------------------------------- chat


def test_chat_keeps_history_and_resets(built: dict, capsys, monkeypatch):
    reg = built["reg"]
    rc, out, _ = cli(capsys, reg, "chat", built["chat"].ref, "--max-new-tokens", "6",
                     stdin="Name a color.\n\n/reset\nName a color.\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert rc == 0
    replies = out.splitlines()
    assert len(replies) == 3 and replies[1] == "(conversation reset)"
    assert replies[0] == replies[2]  # after /reset the same question starts the same conversation

    loaded = load_version(reg, built["chat"].ref)
    seen = []
    real = inference._run  # the engine, as finetune.inference calls it
    monkeypatch.setattr(inference, "_run", lambda lv, ids, s: seen.append(list(ids)) or real(lv, ids, s))
    list(inference.chat(loaded, ["Name a color.", "And another?"], SETTINGS))
    second = loaded.tokenizer.decode(seen[1])
    assert second.count("Name a color.") == 1 and "And another?" in second and seen[1][: len(seen[0])] == seen[0]


def test_chat_refuses_a_version_not_trained_on_messages(built: dict, capsys, monkeypatch):
    rc, out, err = cli(capsys, built["reg"], "chat", "alice/m:1", stdin="hi\n", monkeypatch=monkeypatch)
    assert_one_line_error(rc, err, "alice/m:1", "alpaca", "cannot chat")
    assert out == ""


# ------------------------------------------------------------------------------------------- continuing


def test_continuing_a_version_trains_its_adapter_not_a_new_one(built: dict):
    reg, v1, fork, v2 = built["reg"], built["v1"], built["fork"], built["v2"]
    parent = load_file(str(v1.path / "adapter_model.safetensors"))
    forked = load_file(str(fork.path / "adapter_model.safetensors"))
    assert forked.keys() == parent.keys()  # one adapter, continued: no second one stacked on top
    for key in parent:
        torch.testing.assert_close(forked[key], parent[key], atol=1e-7, rtol=0)
    assert any((load_file(str(v2.path / "adapter_model.safetensors"))[k] - parent[k]).abs().max() > 0 for k in parent)

    assert fork.ref == "bob/fork:1" and fork.parent == {"ref": v1.ref, "id": v1.id}
    assert v2.ref == "alice/m:2" and v2.parent == {"ref": "alice/m:1", "id": v1.id}
    assert [v.ref for v in lineage(reg, v2)] == ["alice/m:2", "alice/m:1", BASE]
    assert v2.metadata["base"] == {"ref": BASE, "id": reg.resolve(BASE).id}
    # And it loads: its own adapter on the root base.
    loaded = load_version(reg, "alice/m:2", merge=False)
    assert list(loaded.model.peft_config) == ["default"]


def test_versions_show_gives_every_hop(built: dict, capsys):
    reg, v2 = built["reg"], built["v2"]
    rc, out, _ = cli(capsys, reg, "versions", "show", "alice/m:2")
    assert rc == 0
    hops = out.split("lineage:")[1].strip().splitlines()
    assert len(hops) == 3
    for hop, version in zip(hops, lineage(reg, v2)):
        assert version.ref in hop and version.id[:12] in hop
        if version.kind == "adapter":
            assert "quickstart.jsonl" in hop and "train_loss" in hop


def test_model_card_and_loss_curve_are_published(built: dict):
    v1 = built["v1"]
    assert {"README.md", "loss.png"} <= v1.manifest["files"].keys()
    assert (v1.path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (v1.path / "README.md").read_text()
    assert BASE in card and "quickstart.jsonl" in card and "alpaca" in card


# ------------------------------------------------------------------------------------------- bad input


def test_unknown_ref_is_a_one_line_error(built: dict, capsys):
    rc, out, err = cli(capsys, built["reg"], "predict", "alice/nope:1", "hi")
    assert_one_line_error(rc, err, "alice/nope", "not found")
    rc, _, err = cli(capsys, built["reg"], "predict", "alice/m:9", "hi")
    assert_one_line_error(rc, err, "alice/m:9", "not found")


def test_empty_prompts_are_refused(built: dict, capsys, tmp_path: Path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    rc, out, err = cli(capsys, built["reg"], "predict", "alice/m:1", "--file", str(empty))
    assert_one_line_error(rc, err, "prompts.jsonl", "empty")
    assert out == ""
    rc, _, err = cli(capsys, built["reg"], "predict", "alice/m:1", "  ")
    assert_one_line_error(rc, err, "prompt is empty")


def test_a_corrupt_adapter_is_refused(damaged_copy: Registry, capsys):
    weights = damaged_copy.resolve("alice/m:1").path / "adapter_model.safetensors"
    writable(weights)
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only a re-hash can tell
    weights.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        finetune.load("alice/m:1", registry=damaged_copy)
    rc, out, err = cli(capsys, damaged_copy, "predict", "alice/m:1", "hi")
    assert_one_line_error(rc, err, "alice/m:1", "damaged", "adapter_model.safetensors")
    assert out == ""


def test_a_base_with_missing_files_is_named_with_how_to_restore_it(damaged_copy: Registry, capsys):
    base = damaged_copy.resolve(BASE)
    writable(base.path / "model.safetensors")
    (base.path / "model.safetensors").unlink()
    rc, out, err = cli(capsys, damaged_copy, "predict", "alice/m:2", "hi")
    assert_one_line_error(rc, err, f"base model {BASE}", "model.safetensors", "restore", "imported from")


def test_a_base_gone_from_the_registry_is_named(damaged_copy: Registry, capsys):
    atomic.remove_tree(damaged_copy.resolve(BASE).path)
    rc, out, err = cli(capsys, damaged_copy, "predict", "alice/m:1", "hi")
    assert_one_line_error(rc, err, BASE, "gone", "restore")


def test_a_version_trained_from_a_local_folder_loads_until_the_folder_moves(
        tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    folder = tmp_path / "base"
    shutil.copytree(tiny_model_dir, folder)
    reg = Registry(tmp_path / "registry")
    version = train(reg, str(folder), "alice/outside", max_steps=1)
    assert version.parent == {"local_path": str(folder), "sha256": folder_sha256(folder)}  # pinned by content
    assert cli(capsys, reg, "predict", version.ref, "hi", "--max-new-tokens", "2")[0] == 0
    folder.rename(tmp_path / "moved")
    rc, _, err = cli(capsys, reg, "predict", version.ref, "hi")
    assert_one_line_error(rc, err, str(folder), "gone", "put the base model back")


def test_a_hub_base_missing_from_the_cache_says_how_to_fetch_it(registry: Registry, tmp_path: Path):
    # HF_HUB_OFFLINE=1 (conftest): the hub id cannot be fetched, which is what a cleared cache looks like.
    empty = tmp_path / "empty"
    empty.mkdir()
    registry.create_model("hub/base")
    meta = {"source": {"type": "hub", "repo_id": "nobody/no-such-model", "revision": "0" * 40}}
    registry.publish("hub/base", empty, parent={"hub_id": "nobody/no-such-model", "revision": "0" * 40},
                     metadata=meta, kind="base")
    with pytest.raises(ModelLoadError) as info:
        finetune.load("hub/base:1", registry=registry)
    assert "nobody/no-such-model" in str(info.value) and "hf download" in str(info.value)
