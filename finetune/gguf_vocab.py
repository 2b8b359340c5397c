"""A Hugging Face tokenizer as GGUF metadata: the vocabulary, merges or scores, token types and special tokens.

The ``gguf`` package reads tokenizer folders (:class:`gguf.BpeVocab`, :class:`gguf.SentencePieceVocab`,
:class:`gguf.LlamaHfVocab`, :class:`gguf.SpecialVocab`); this module picks the right reader for a tokenizer, fixes
what those readers leave to their callers, and refuses a tokenizer llama.cpp would split differently:

* Byte-level BPE (GPT-2, Llama 3, Qwen2/3, finetune's tiny models) is written as ``tokenizer.ggml.model = gpt2``
  with its merges, plus ``tokenizer.ggml.pre``: the name under which llama.cpp knows the pre-tokenizer's split
  pattern. The pattern is read from ``tokenizer.json`` and matched against the known ones; an unknown pattern is
  refused, because llama.cpp would silently cut words in other places than the model was trained on.
* SentencePiece (Llama 2, Mistral, Gemma, Phi-3) is written as ``llama`` with per-token scores: from
  ``tokenizer.model`` when ``sentencepiece`` is installed, otherwise from ``tokenizer.json``, whose merge ranks
  give the scores (llama.cpp merges the pair whose result scores highest; transformers the lowest-ranked pair).
* Token types: special tokens are ``CONTROL`` (llama.cpp parses them in templates and does not print them),
  other added tokens ``USER_DEFINED``; ids the embedding has beyond the tokenizer become ``UNUSED`` padding.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

# The byte-level split patterns llama.cpp knows, by its name for them. GPT-2's own pattern is built into the
# tokenizers library's ByteLevel pre-tokenizer (use_regex=true); the others come as an explicit Split.
_GPT2 = "gpt-2"
_PREFERRED_NAMES = ("llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o")


def _known_splits() -> dict[str, str]:
    """Split regex -> llama.cpp pre-tokenizer name, from transformers' table of the GGUF pre-tokenizers."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # another transformers layout: only GPT-2's pattern is then recognised
        return {}
    table: dict[str, str] = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if name in _PREFERRED_NAMES or regex not in table:
            table[regex] = name
    return table


@dataclass
class GGUFVocab:
    """Everything the writer needs about a tokenizer."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # tokenizer.ggml.pre (byte-level BPE only)
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    space_prefix: bool | None = None  # SentencePiece: whether text gets a leading "▁" (Llama 2 yes, Gemma no)
    special: Any = None  # gguf.SpecialVocab: bos/eos/unk/pad ids, add_bos/add_eos, chat template

    def add_to(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.space_prefix is not None:
            writer.add_add_space_prefix(self.space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def gguf_vocab(tokenizer: Any, n_embeddings: int, chat_template: str | None) -> GGUFVocab:
    """The GGUF vocabulary of ``tokenizer`` (a transformers fast tokenizer) for a model with ``n_embeddings``
    rows in its embedding; ``chat_template`` (Jinja) is embedded as ``tokenizer.chat_template``."""
    import gguf

    # SpecialVocab logs its guesses about pair templates, which GGUF never uses: nothing for users to act on.
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="finetune-gguf-vocab-") as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(str(folder))  # the readers of the gguf package take a tokenizer folder
        spec = _read_json(folder / "tokenizer.json")
        model = spec.get("model") or {}
        if model.get("type") == "BPE" and not model.get("byte_fallback") and \
                (spec.get("decoder") or {}).get("type") == "ByteLevel":
            vocab = _byte_level(folder, spec)
        elif model.get("type") == "BPE" and model.get("byte_fallback"):
            vocab = _sentencepiece(folder, model)
            vocab.space_prefix = _space_prefix(spec)
        else:
            kind = model.get("type") or "unknown"
            raise UsageError(f"the tokenizer ({kind} model) cannot be written to GGUF",
                             "GGUF export supports byte-level BPE and SentencePiece-style BPE tokenizers")
        _mark_added(vocab, tokenizer)
        _pad(vocab, n_embeddings)
        vocab.special = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(vocab.tokens))
        vocab.special.chat_template = chat_template
    return vocab


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError("the tokenizer has no tokenizer.json (a slow tokenizer)",
                         "GGUF export needs a fast tokenizer; load the base with one and import it again")
    return json.loads(path.read_text(encoding="utf-8"))


def _byte_level(folder: Path, spec: dict[str, Any]) -> GGUFVocab:
    import gguf

    pre = _pre_name(spec.get("pre_tokenizer"))
    reader = gguf.BpeVocab(folder)
    tokens, scores, types = _columns(reader.all_tokens())
    merges = gguf.SpecialVocab(folder, load_merges=True).merges
    return GGUFVocab("gpt2", pre, tokens, scores, types, merges)


def _pre_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, or a UsageError naming what is not known."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return _GPT2
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        name = _known_splits().get(regex or "")
        if name:
            return name
        raise UsageError(f"the tokenizer splits words with a pattern llama.cpp does not know: {regex!r}",
                         "GGUF export supports the byte-level tokenizers of GPT-2, Llama 3, Qwen2/3 and their kin")
    raise UsageError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no GGUF equivalent",
                     "GGUF export supports the byte-level tokenizers of GPT-2, Llama 3, Qwen2/3 and their kin")


def _sentencepiece(folder: Path, model: dict[str, Any]) -> GGUFVocab:
    import gguf

    if (folder / "tokenizer.model").is_file():
        try:
            reader = gguf.SentencePieceVocab(folder)
        except RuntimeError:  # sentencepiece is not installed: the scores come from tokenizer.json below
            pass
        else:
            return GGUFVocab("llama", None, *_columns(reader.all_tokens()))
    try:
        reader = gguf.LlamaHfVocab(folder)  # token texts and byte tokens; its scores are placeholders
        tokens, _, types = _columns(reader.all_tokens())
    except FileNotFoundError:  # it expects the older layout (a Sequence decoder); newer ones use Metaspace
        by_id = sorted(model["vocab"].items(), key=lambda item: item[1])
        tokens = [text.encode("utf-8") for text, _ in by_id]
        types = [int(gguf.TokenType.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) else gguf.TokenType.NORMAL)
                 for text, _ in by_id]
    rank = {}
    for k, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, k)
    scores = [-float(rank.get(text.decode("utf-8", "replace"), len(rank)) + 1) if t == gguf.TokenType.NORMAL
              else 0.0 for text, t in zip(tokens, types)]
    return GGUFVocab("llama", None, tokens, scores, types)


def _space_prefix(spec: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text: a Prepend normalizer (Llama 2's
    layout) or a Metaspace pre-tokenizer that prepends (the newer one); Gemma's does neither."""
    def steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        node = node or {}
        return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]

    if any(step.get("type") == "Prepend" for step in steps(spec.get("normalizer"), "normalizers")):
        return True
    return any(step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never"
               for step in steps(spec.get("pre_tokenizer"), "pretokenizers"))


def _columns(rows: Any) -> tuple[list[bytes], list[float], list[int]]:
    tokens, scores, types = [], [], []
    for text, score, kind in rows:
        tokens.append(text)
        scores.append(float(score))
        types.append(int(kind))
    return tokens, scores, types


def _mark_added(vocab: GGUFVocab, tokenizer: Any) -> None:
    """Special tokens as CONTROL and other added tokens as USER_DEFINED, wherever their ids sit (a trained BPE
    keeps its special tokens inside the base vocabulary, where the readers call them NORMAL)."""
    import gguf

    for token_id, added in tokenizer.added_tokens_decoder.items():
        if token_id < len(vocab.types):
            vocab.types[token_id] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)


def _pad(vocab: GGUFVocab, n_embeddings: int) -> None:
    """Embedding rows past the tokenizer (vocabularies padded to a multiple of 64 or 128) get unused tokens."""
    import gguf

    if len(vocab.tokens) > n_embeddings:
        raise UsageError(f"the tokenizer has {len(vocab.tokens)} tokens but the model only {n_embeddings} embeddings",
                         "export a model whose tokenizer matches its embedding")
    for k in range(len(vocab.tokens), n_embeddings):
        vocab.tokens.append(f"[PAD{k}]".encode())
        vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))
