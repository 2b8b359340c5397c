"""Tiny local base models: a tokenizer trained here, randomly initialised models, and the shipped sample data.

Tests, the quickstart and the benchmark must never download from a hub, yet they should exercise the real
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` path. So this module trains a
byte-level BPE tokenizer with the ``tokenizers`` library, builds a causal LM of one of several architectures
(:data:`ARCHITECTURES`: Llama, Qwen2, GPT-2) from a config with a seeded random init, and saves both as an
ordinary Hugging Face folder. Every architecture shares the same tokenizer conventions.

The tokenizer's conventions, which the rest of the engine relies on:

* special tokens ``<unk>``, ``<s>`` (bos), ``</s>`` (eos), ``<pad>`` (its own id, never eos) and the chat
  token ``<|im_start|>``;
* every encoding starts with bos (added by the post-processor); eos is never added automatically, so
  training code appends it where a model should learn to stop;
* the chat template is ChatML-like: each turn is ``<|im_start|>ROLE\\nCONTENT</s>\\n``. Turns end with the
  eos token rather than a separate ``<|im_end|>`` so that a model trained on assistant turns stops with the
  eos that ``generate`` already watches for. Assistant content and its eos sit inside
  ``{% generation %}`` so ``return_assistant_tokens_mask=True`` marks exactly what a model should learn.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from .errors import AlreadyExistsError, DataError, UsageError

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# What each tiny architecture stands for: Llama (RMSNorm, gated SiLU MLP, rotary positions, tied head); Qwen2
# (Llama's layout plus biases on q/k/v, grouped-query attention and an untied head by default); GPT-2 (Conv1D
# projections with fused q/k/v and biases everywhere, LayerNorm, GELU MLP, learned positions, tied head).
ARCHITECTURES = ("llama", "qwen2", "gpt2")
IM_START = "<|im_start|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IM_START)

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] + eos_token -}}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The scaffolding of the standard Alpaca prompt (Taori et al., 2023). The tokenizer is trained on records
# rendered with it so that its words become single tokens: otherwise every training example would spend
# ~150 byte-level tokens on boilerplate, which makes tiny-model training several times slower.
_ALPACA_HEADER = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes the "
    "request.\n\n"
)
_ALPACA_WITH_INPUT = (
    _ALPACA_HEADER.format(ctx=", paired with an input that provides further context")
    + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
_ALPACA_NO_INPUT = _ALPACA_HEADER.format(ctx="") + "### Instruction:\n{instruction}\n\n### Response:\n{output}"


def sample_data_path() -> Path:
    """The shipped sample instruction data (``assets/quickstart.jsonl``, Alpaca format, one record a line)."""
    # resources.files() is a real directory for both editable and wheel installs (the package is never zipped).
    path = Path(str(resources.files(__package__) / "assets" / "quickstart.jsonl"))
    if not path.is_file():
        raise DataError(f"sample data {path} is missing", "reinstall finetune; the package data was not installed")
    return path


def load_sample_records() -> list[dict[str, str]]:
    """The sample data as a list of ``{"instruction", "input", "output"}`` dicts."""
    with sample_data_path().open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def alpaca_texts(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The texts to train a tokenizer on for Alpaca-like records: each record rendered as one training example.

    Records with ``instruction``/``output`` (and optional ``input``) are rendered with the standard Alpaca
    prompt. Other records (``prompt``/``completion``, ``text``, chat ``messages``) contribute their string
    contents, so a tokenizer trained on them still covers their words.
    """
    for record in records:
        if "instruction" in record and "output" in record:
            template = _ALPACA_WITH_INPUT if record.get("input") else _ALPACA_NO_INPUT
            yield template.format(
                instruction=record["instruction"], input=record.get("input") or "", output=record["output"]
            )
            continue
        for value in record.values():
            if isinstance(value, str) and value:
                yield value
            elif isinstance(value, list):  # chat messages
                yield from (m["content"] for m in value if isinstance(m, Mapping) and isinstance(m.get("content"), str))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a Hugging Face fast tokenizer.

    Byte-level means every string is encodable (``<unk>`` exists only by convention). The result has the
    special tokens and chat template described in this module's docstring; ``vocab_size`` is an upper bound
    (a small corpus runs out of merges first). Deterministic for the same texts and ``vocab_size``.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UsageError(
            f"vocab_size {vocab_size} is too small", f"use at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)"
        )
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_chat_scaffolding_then(texts), trainer=trainer)
    # Only bos: eos is where a model learns to stop, so the data pipeline decides where it goes.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _chat_scaffolding_then(texts: Iterable[str]) -> Iterator[str]:
    # The role names appear in every chat-formatted example; seeing them once keeps them in the vocabulary.
    yield "system\nuser\nassistant\n"
    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"tokenizer training text is a {type(text).__name__}, not a string", "pass strings only")
        yield text


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    initializer_range: float | None = None,
    seed: int = 0,
    texts: Iterable[str] | None = None,
    vocab_size: int = 1024,
    tie_embeddings: bool | None = None,
) -> Path:
    """Save a randomly initialised causal LM and its tokenizer as a Hugging Face folder in ``out_dir``.

    ``arch`` is one of :data:`ARCHITECTURES`.
    Without ``tokenizer``, one is trained on ``texts`` (default: the sample data rendered by
    :func:`alpaca_texts`) with ``vocab_size``. Weights depend only on ``seed`` and the sizes, and the global
    torch RNG is left untouched. ``intermediate_size`` defaults to ~8/3 x hidden rounded up to a
    multiple of 32 for the gated MLPs (Llama, Qwen2) and 4 x hidden for GPT-2; ``num_kv_heads`` defaults to
    ``num_heads`` (GPT-2 has no grouped-query attention); ``initializer_range`` (the std of the normal init)
    defaults to ``hidden_size ** -0.5``. ``tie_embeddings`` defaults to tied input and output embeddings for
    Llama and GPT-2 (as in their small releases) and untied for Qwen2. ``out_dir`` may exist but must be
    empty. Returns ``out_dir`` as a path.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlreadyExistsError(f"{out} already exists and is not an empty folder", "choose a new or empty folder")
    if arch not in ARCHITECTURES:
        raise UsageError(f"unknown architecture {arch!r}", f"use one of {', '.join(ARCHITECTURES)}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if arch == "gpt2" and num_kv_heads != num_heads:
        raise UsageError("GPT-2 has no grouped-query attention", "leave num_kv_heads unset for arch gpt2")
    if intermediate_size is None:
        intermediate_size = 4 * hidden_size if arch == "gpt2" else -(-hidden_size * 8 // 3 // 32) * 32
    _check_sizes(
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings, initializer_range
    )

    if tokenizer is None:
        if texts is None:
            texts = alpaca_texts(load_sample_records())
        tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    elif texts is not None:
        raise UsageError("both a tokenizer and texts to train one on were given", "pass only one of them")
    else:
        tokenizer = copy.deepcopy(tokenizer)  # model_max_length is set below; the caller's object stays as it was
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is None:
            raise UsageError(f"the tokenizer has no {name[:-3]}", "use train_tokenizer() or set that special token")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UsageError("the tokenizer's pad token is its eos token", "give it a distinct pad token")
    tokenizer.model_max_length = max_position_embeddings

    config = _config(
        arch, vocab_size=len(tokenizer), hidden=hidden_size, intermediate=intermediate_size, layers=num_layers,
        heads=num_heads, kv_heads=num_kv_heads, max_pos=max_position_embeddings,
        tie=arch != "qwen2" if tie_embeddings is None else tie_embeddings,
        # Llama's 0.02 suits hidden sizes in the thousands. At hidden 64-512 it caps every logit near
        # 0.02 * hidden (the frozen tied embedding times a unit-RMS state), so the loss cannot fall below
        # ~ln(vocab) - 0.02 * hidden: LoRA then picks the right argmax but reports a loss stuck near 4-5.
        # 1/sqrt(hidden) gives logits of a realistic scale (measured: 70/70 sample prompts exact after
        # 100 LoRA steps at loss 0.35, versus 10/70 at loss 5.3 with 0.02; hidden 128, 4 layers, r=16, lr 2e-3).
        init=hidden_size**-0.5 if initializer_range is None else initializer_range,
        special={name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    return save_random_model(config, tokenizer, out, seed)


def save_random_model(config: Any, tokenizer: Any, out: Path, seed: int) -> Path:
    """A model of ``config`` with weights drawn from ``seed``, saved with ``tokenizer`` into ``out``."""
    # fork_rng: seeding must not disturb the caller's random stream (tests and training seed their own).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _config(arch: str, *, vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
            max_pos: int, tie: bool, init: float, special: dict[str, int]) -> PretrainedConfig:
    if arch == "gpt2":
        # Dropout off: the tiny models are for exact tests and benchmarks (peft and finetune default to none).
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=heads,
                          n_positions=max_pos, tie_word_embeddings=tie, initializer_range=init, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **special)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_pos, tie_word_embeddings=tie, initializer_range=init, **special)
    if arch == "qwen2":
        return Qwen2Config(**common)  # q/k/v biases are part of Qwen2's layout
    return LlamaConfig(**common)


def _check_sizes(
    hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, max_pos: int,
    initializer_range: float | None,
) -> None:
    for name, value in (
        ("hidden_size", hidden),
        ("num_layers", layers),
        ("num_heads", heads),
        ("num_kv_heads", kv_heads),
        ("intermediate_size", intermediate),
        ("max_position_embeddings", max_pos),
    ):
        if value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value}", f"set {name} to 1 or more")
    if initializer_range is not None and not initializer_range > 0:
        raise UsageError(f"initializer_range must be positive, got {initializer_range}", "use e.g. 0.02")
    if hidden % heads:
        raise UsageError(f"hidden_size {hidden} is not divisible by num_heads {heads}", "pick sizes that divide")
    if heads % kv_heads:
        raise UsageError(f"num_heads {heads} is not divisible by num_kv_heads {kv_heads}", "pick sizes that divide")
    if (hidden // heads) % 2:
        raise UsageError(f"head size {hidden // heads} is odd", "rotary embeddings need an even hidden_size/num_heads")
