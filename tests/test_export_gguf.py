"""GGUF export: transformers loads every exported family back (``from_pretrained(..., gguf_file=...)``) and its
logits match the merged model's, the tokenizer and the prompt format travel inside the file, the Ollama Modelfile
renders as the embedded template does, and what cannot be converted is refused before any weight is read.

Tolerances. A GGUF file holds the merged fp32 weights rounded to f16 (or to Q8_0 blocks); vectors stay fp32. The
reference is therefore the merged model with exactly that rounding applied (``_rounded``), which leaves only the
order of fp32 sums between the two forward passes: 1e-5 of the logits' scale covers it. Against the unrounded
model, f16 moves logits by ~1e-3 of their scale here, and the test states top-1 agreement for q8_0.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from helpers import assert_one_line_error

from finetune.cli import main
from finetune.config import config_from_dict
from finetune.data.formats import encode_prompt, prompt_for
from finetune.errors import UsageError
from finetune.export import export
from finetune.gguf_template import ollama_template
from finetune.inference import load_version
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.tiny import alpaca_texts, load_sample_records, sample_data_path, train_tokenizer
from finetune.tiny_families import FAMILIES, build_family_model, train_sentencepiece_style_tokenizer
from finetune.training import train

# Held out: none of these is in the sample data the versions train on.
PROMPTS = ["Name three colors of the rainbow and one fruit.", "Write a haiku about a quiet harbor at dawn."]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """base/FAMILY:1 for every family GGUF export writes; base/spm:1 (a Llama with a SentencePiece-style
    tokenizer); alice/m:1 (LoRA on base/llama, Alpaca data) and alice/chat:1 (LoRA on base/qwen2, chat messages)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        root = tmp_path_factory.mktemp("gguf")
        registry = Registry(root / "registry")
        texts = list(alpaca_texts(load_sample_records()))
        tokenizer = train_tokenizer(texts)
        for family in FAMILIES:
            import_base(registry, f"base/{family}", str(build_family_model(root / family, family, tokenizer)))
        spm = train_sentencepiece_style_tokenizer(texts)
        import_base(registry, "base/spm", str(build_family_model(root / "spm", "llama", spm)))
        chat = root / "chat.jsonl"
        chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                         {"role": "assistant", "content": r["output"]}]}) + "\n"
                                for r in load_sample_records()[:24]))
        for dest, base, data in (("alice/m", "base/llama:1", sample_data_path()), ("alice/chat", "base/qwen2:1", chat)):
            cfg = config_from_dict({"base_model": base, "data": {"path": str(data), "max_seq_len": 256},
                                    "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2}})
            train(cfg, registry=registry, destination=dest, create_destination=True, progress=False)
        yield registry


def _gguf(out: Path) -> Path:
    (path,) = out.glob("*.gguf")
    return path


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _rounded(model, quantize: str):
    """The model with every matrix rounded as the GGUF file stores it (vectors stay fp32)."""
    copy_ = copy.deepcopy(model)
    conv1d = model.config.model_type == "gpt2"  # stored transposed, so Q8_0 blocks run along the other axis
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, p in copy_.named_parameters():
            if p.ndim < 2:
                continue
            w = p.T if conv1d and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else p
            if quantize == "q8_0" and w.shape[-1] % 32 == 0:
                w.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.contiguous().numpy(), q8), q8)))
            else:
                w.copy_(w.half().float())
    return copy_


def _logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(p)["input_ids"]])).logits[0] for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma"])
def test_f16_file_loads_in_transformers_with_the_merged_logits(reg: Registry, family: str, tmp_path: Path):
    ref = "alice/m:1" if family == "llama" else f"base/{family}:1"  # llama: a fine-tune, merged on export
    path = _gguf(export(reg, ref, tmp_path / "out", format="gguf"))
    merged = load_version(reg, ref, device="cpu", precision="fp32")
    model, tokenizer = _load_gguf(path)
    for text in PROMPTS:  # the file's own tokenizer splits text as the version's does
        assert tokenizer(text)["input_ids"] == merged.tokenizer(text)["input_ids"]
    got = _logits(model, merged.tokenizer, PROMPTS)
    want = _logits(_rounded(merged.model, "f16"), merged.tokenizer, PROMPTS)
    exact = _logits(merged.model, merged.tokenizer, PROMPTS)
    for g, w, e in zip(got, want, exact):
        scale = e.abs().max()
        torch.testing.assert_close(g, w, atol=1e-5 * scale, rtol=0)
        assert (g - e).abs().max() < 5e-3 * scale  # f16 rounding itself: ~1e-3 of the scale
        assert torch.equal(g.argmax(-1), e.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_q8_0_file_matches_its_blocks_and_keeps_the_top_token(reg: Registry, family: str, tmp_path: Path, capsys):
    ref = "alice/m:1" if family == "llama" else f"base/{family}:1"
    rc = main(["--registry", str(reg.root), "export", ref, str(tmp_path / "out"), "--format", "gguf",
               "--quantize", "q8_0"])
    assert rc == 0 and capsys.readouterr().out.strip() == str(tmp_path / "out")
    path = _gguf(tmp_path / "out")
    assert path.name.endswith(".q8_0.gguf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    merged = load_version(reg, ref, device="cpu", precision="fp32")
    model, _ = _load_gguf(path)
    got = _logits(model, merged.tokenizer, PROMPTS)
    want = _logits(_rounded(merged.model, "q8_0"), merged.tokenizer, PROMPTS)
    exact = _logits(merged.model, merged.tokenizer, PROMPTS)
    agree = total = 0
    for g, w, e in zip(got, want, exact):
        torch.testing.assert_close(g, w, atol=1e-5 * e.abs().max(), rtol=0)
        agree += int((g.argmax(-1) == e.argmax(-1)).sum())
        total += g.shape[0]
    print(f"q8_0 {family}: top-1 agreement with the merged fp32 model {agree}/{total}")
    assert agree / total >= 0.9  # measured: 100% (llama), 96% (gpt2) on these random-init tiny models


@pytest.mark.slow
def test_gemma_file_holds_llama_cpp_layout(reg: Registry, tmp_path: Path):
    """transformers reads no Gemma (1) GGUF back; the file is checked directly (llama.cpp runs it in
    scripts/check_gguf.py): RMSNorm weights plus one, no output layer (tied to the embedding)."""
    path = _gguf(export(reg, "base/gemma:1", tmp_path / "out", format="gguf"))
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    merged = load_version(reg, "base/gemma:1", device="cpu", precision="fp32").model
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "gemma"
    assert "output.weight" not in tensors
    norm = np.asarray(tensors["blk.0.attn_norm.weight"].data)
    np.testing.assert_array_equal(norm, merged.model.layers[0].input_layernorm.weight.numpy() + 1)


@pytest.mark.slow
def test_sentencepiece_style_vocabulary_round_trips(reg: Registry, tmp_path: Path):
    path = _gguf(export(reg, "base/spm:1", tmp_path / "out", format="gguf"))
    reader = gguf.GGUFReader(path)
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    merged = load_version(reg, "base/spm:1", device="cpu", precision="fp32")
    model, tokenizer = _load_gguf(path)
    # transformers rebuilds the merges from the scores the export wrote, so equal ids mean equal scores order
    # (text starting with a space is left out: transformers' Llama GGUF tokenizer adds one prefix space there,
    # the original two; llama.cpp follows the original)
    for text in [*PROMPTS, "naïve café 😀 ### Response:\n  two  spaces"]:
        assert tokenizer(text)["input_ids"] == merged.tokenizer(text)["input_ids"]
    got = _logits(model, merged.tokenizer, PROMPTS)
    want = _logits(_rounded(merged.model, "f16"), merged.tokenizer, PROMPTS)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5 * w.abs().max(), rtol=0)


def _field(reader: gguf.GGUFReader, key: str) -> str:
    return bytes(reader.fields[key].parts[-1]).decode()


@pytest.mark.slow
def test_prompt_format_becomes_the_chat_template_and_the_modelfile(reg: Registry, tmp_path: Path):
    out = export(reg, "alice/m:1", tmp_path / "out", format="gguf")
    path = _gguf(out)
    assert path.name == "m-v1.f16.gguf"
    reader = gguf.GGUFReader(path)
    template = _field(reader, "tokenizer.chat_template")
    merged = load_version(reg, "alice/m:1", device="cpu", precision="fp32")
    tokenizer = merged.tokenizer
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], chat_template=template,
                                             tokenize=False, add_generation_prompt=True)
    # one user message renders as `finetune predict` prompts an Alpaca-trained version: bos, then the prompt
    assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == \
        encode_prompt("alpaca", tokenizer, prompt_for("alpaca", tokenizer, PROMPTS[0]))
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{path.name}" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert "### Instruction:\n{{ .Content }}\n\n### Response:\n" in modelfile
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", path.name]


@pytest.mark.slow
def test_chat_version_embeds_its_trained_template_and_a_go_template(reg: Registry, tmp_path: Path):
    out = export(reg, "alice/chat:1", tmp_path / "out", format="gguf")
    reader = gguf.GGUFReader(_gguf(out))
    loaded = load_version(reg, "alice/chat:1", device="cpu", precision="fp32")
    embedded = _field(reader, "tokenizer.chat_template")
    # transformers' {% generation %} tags are left out (other Jinja engines refuse them); renders are unchanged
    assert "generation -%}" in loaded.tokenizer.chat_template and "generation -%}" not in embedded
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]):
        assert loaded.tokenizer.apply_chat_template(messages, chat_template=embedded, tokenize=False) == \
            loaded.tokenizer.apply_chat_template(messages, tokenize=False)
    modelfile = (out / "Modelfile").read_text()
    assert ('{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}</s>\n'
            '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}</s>\n') in modelfile
    assert modelfile.count('"""') == 2 and modelfile.split('"""')[1].endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_go_template_is_refused_where_it_cannot_reproduce_the_jinja(reg: Registry):
    tokenizer = load_version(reg, "base/llama:1", device="cpu", precision="fp32").tokenizer
    # Llama 2 style: the system prompt goes inside the first user turn, which no per-role prefix can express
    llama2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
              "{% elif m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>{{ sys }}<</SYS>> {% endif %}"
              "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    go = ollama_template(tokenizer, llama2, "<s>")
    assert go is not None and "system" not in go  # user/assistant only: the system turn is left to Ollama
    assert ollama_template(tokenizer, "{{ raise_exception('no') }}", "<s>") is None


def test_unsupported_architecture_is_refused_before_any_weight_is_read(registry: Registry, tmp_path: Path,
                                                                       tiny_model_dir: Path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    import finetune.inference as inference

    folder = tmp_path / "neox"
    AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=1030, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    train_tokenizer(["some text"], vocab_size=300).save_pretrained(folder)
    import_base(registry, "base/neox", str(folder))
    monkeypatch.setattr(inference, "load_version", lambda *a, **k: pytest.fail("weights were loaded"))
    capsys.readouterr()  # the setup's progress bars
    rc = main(["--registry", str(registry.root), "export", "base/neox", str(tmp_path / "out"), "--format", "gguf"])
    assert_one_line_error(rc, capsys.readouterr().err, "gpt_neox", "Llama (llama)", "Mistral", "Qwen2", "Gemma",
                          "Phi-3 (phi3)")
    assert rc == 2 and not (tmp_path / "out").exists()
    import_base(registry, "base/llama", str(tiny_model_dir))
    with pytest.raises(UsageError, match="q4_k"):
        export(registry, "base/llama:1", tmp_path / "out", format="gguf", quantize="q4_k")


def test_rope_scaling_llama_cpp_would_misread_is_refused():
    from transformers import LlamaConfig

    from finetune.export_gguf import check_supported

    yarn = LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256})
    with pytest.raises(UsageError, match="'yarn' rotary scaling"):
        check_supported(yarn, "f16")
    llama3 = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert check_supported(llama3, "f16").name == "Llama"


def test_quantize_needs_the_gguf_format(registry: Registry, tmp_path: Path, capsys):
    rc = main(["--registry", str(registry.root), "export", "alice/m:1", str(tmp_path / "out"), "--quantize", "q8_0"])
    assert_one_line_error(rc, capsys.readouterr().err, "quantize", "--format gguf")
    assert rc == 2 and not (tmp_path / "out").exists()


def test_a_missing_gguf_package_is_named(registry: Registry, tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    import importlib.util

    import_base(registry, "base/llama", str(tiny_model_dir))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(UsageError, match="needs the gguf package") as err:
        export(registry, "base/llama:1", tmp_path / "out", format="gguf")
    assert "pip install gguf" in err.value.hint and not (tmp_path / "out").exists()


def test_a_phi3_name_without_phi3_tokens_is_not_written_as_one():
    """llama.cpp gives Phi-3's special tokens attributes by the model's name, and fails to load a vocabulary
    named phi3 that lacks them (found running a tiny Phi-3 in llama.cpp: 'unordered_map::at')."""
    from finetune.export_gguf import _safe_name
    from finetune.gguf_vocab import GGUFVocab

    tiny = GGUFVocab("gpt2", "gpt-2", [b"<unk>", b"<s>", b"</s>", b"a"], [0.0] * 4, [1] * 4)
    real = GGUFVocab("llama", None, [b"<unk>", b"<s>", b"</s>", b"<|endoftext|>"], [0.0] * 4, [1] * 4)
    assert _safe_name("base/Phi3:1", tiny) == "base/phi 3:1"
    assert _safe_name("base/phi3:1", real) == "base/phi3:1" and _safe_name("alice/bot:2", tiny) == "alice/bot:2"
