"""Tiny random models of every family GGUF export writes, for its tests and ``scripts/check_gguf.py``.

:mod:`finetune.tiny` builds Llama, Qwen2 and GPT-2 (the families training is tested on); this adds Mistral,
Qwen3, Gemma, Gemma 2 and Phi-3 at the same scale, with the same tokenizer. Sizes follow the real models where
llama.cpp or transformers' GGUF loader assume them: Qwen3's head_dim is 128 (transformers reads no head size
from a Qwen3 GGUF), Gemma 2's is 256 with queries scaled by it (transformers reads no query scale either).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import UsageError
from .tiny import ARCHITECTURES, build_tiny_model, save_random_model

FAMILIES = (*ARCHITECTURES, "mistral", "qwen3", "gemma", "gemma2", "phi3")


def build_family_model(out_dir: str | os.PathLike[str], family: str, tokenizer: Any, *, seed: int = 0,
                       hidden_size: int = 64, num_layers: int = 2) -> Path:
    """A random ``family`` model (one of :data:`FAMILIES`) with ``tokenizer``, saved as a Hugging Face folder."""
    if family in ARCHITECTURES:
        return build_tiny_model(out_dir, tokenizer, arch=family, hidden_size=hidden_size, num_layers=num_layers,
                                seed=seed)
    from transformers import Gemma2Config, GemmaConfig, MistralConfig, Phi3Config, Qwen3Config

    heads = 4
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                  max_position_embeddings=1024, initializer_range=hidden_size ** -0.5,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if family == "mistral":
        config = MistralConfig(**common, sliding_window=None)
    elif family == "qwen3":
        config = Qwen3Config(**common, head_dim=128)
    elif family == "gemma":
        config = GemmaConfig(**common, head_dim=hidden_size // heads)
    elif family == "gemma2":
        config = Gemma2Config(**common, head_dim=256, query_pre_attn_scalar=256, sliding_window=512)
    elif family == "phi3":
        config = Phi3Config(**{**common, "num_key_value_heads": heads}, original_max_position_embeddings=1024)
    else:
        raise UsageError(f"unknown family {family!r}", f"use one of {', '.join(FAMILIES)}")
    return save_random_model(config, tokenizer, Path(out_dir), seed)


def train_sentencepiece_style_tokenizer(texts: Any, vocab_size: int = 1024) -> Any:
    """A byte-fallback BPE tokenizer laid out as Llama 2's, Mistral's and Gemma's ``tokenizer.json`` are
    (``▁`` for spaces, a prefix ``▁``, ``<0xNN>`` byte tokens after the specials, bos added), trained on ``texts``.

    The other kind of vocabulary GGUF export writes (``tokenizer.ggml.model = llama``, with scores).
    """
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from .tiny import BOS, EOS, PAD, UNK

    def layout(backend: Any) -> Any:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        return backend

    learner = layout(Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True)))
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 260, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate([UNK, BOS, EOS, PAD] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in learned["merges"]]
    backend = layout(Tokenizer(models.BPE(vocab, merges, unk_token=UNK, byte_fallback=True, fuse_unk=True)))
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD)
