"""The folder a GGUF export writes: ``NAME-vN.QUANT.gguf``, an Ollama ``Modelfile`` and a short ``README.md``.

:func:`plan_gguf` does every check that needs no weights (the version's files, the architecture, the rotary
scaling, the tokenizer, the template) so an export that cannot succeed stops before the minutes of loading and
merging; :meth:`GGUFPlan.write` then merges the adapter in fp32 on the CPU and writes the files.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .data.formats import encode_prompt
from .errors import ModelLoadError, UsageError
from .export_gguf import check_supported, write_gguf
from .gguf_template import (
    modelfile,
    ollama_template,
    portable_template,
    prompt_format_template,
    prompt_format_turns,
)
from .gguf_vocab import GGUFVocab, gguf_vocab
from .inference import prompt_format_of, resolve_version
from .registry import Registry, Version


@dataclass
class GGUFPlan:
    """A checked GGUF export, ready to write."""

    registry: Registry
    version: Version
    quantize: str
    vocab: GGUFVocab
    template: str
    go_template: str | None
    stops: list[str]

    @property
    def file_name(self) -> str:
        return f"{self.version.model.split('/')[1]}-v{self.version.number}.{self.quantize}.gguf"

    def write(self, folder: Path) -> None:
        """Merge and write the files into ``folder`` (an empty staging folder)."""
        from .inference import load_version

        loaded = load_version(self.registry, self.version.ref, device="cpu", merge=True, precision="fp32")
        description = f"{self.version.ref} (id {self.version.id[:12]}), exported by finetune"
        write_gguf(folder / self.file_name, loaded.model, self.vocab, self.quantize, self.version.ref, description)
        (folder / "Modelfile").write_text(
            modelfile(self.file_name, self.go_template, self.stops, f"{self.version.ref}, exported by finetune"),
            encoding="utf-8")
        (folder / "README.md").write_text(self._card(loaded.resolved.base.description), encoding="utf-8")

    def _card(self, base: str) -> str:
        fmt = prompt_format_of(self.version)
        return "\n".join([
            f"# {self.version.ref} ({self.quantize} GGUF)", "",
            f"`{self.version.ref}` (id `{self.version.id[:12]}`, base `{base}`) merged and written as GGUF "
            f"({self.quantize}) by finetune, with its tokenizer and its prompt format (`{fmt}`) as the chat template.",
            "", "```bash",
            f"llama-cli -m {self.file_name} -p 'PROMPT'          # llama.cpp",
            "ollama create my-model -f Modelfile && ollama run my-model   # Ollama",
            "```", ""])


def plan_gguf(reg: Registry, ref: str, quantize: str) -> GGUFPlan:
    """Check that version ``ref`` can be written as GGUF, reading configs and the tokenizer but no weights."""
    from transformers import AutoConfig

    from .modeling.load import load_tokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UsageError("GGUF export needs the gguf package", "pip install gguf (or pip install 'finetune[gguf]')")
    resolved = resolve_version(reg, ref)  # unknown refs, damaged versions and missing bases fail here
    version, base = resolved.chain[0], resolved.base
    try:
        config = AutoConfig.from_pretrained(base.load_path, revision=base.revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the config of base model {base.description}: {err}",
                             f"run `finetune versions verify {version.ref}`") from None
    check_supported(config, quantize)
    tokenizer = load_tokenizer(base)
    fmt = prompt_format_of(version)
    trained = (version.metadata.get("prompt_format") or {}).get("chat_template")
    turns = None  # a chat template's turns are read off its renders; a prompt format's are known
    if fmt == "messages" or (version.kind == "base" and getattr(tokenizer, "chat_template", None)):
        template = portable_template(tokenizer, trained or tokenizer.chat_template)
    else:
        template = prompt_format_template(fmt, adds_bos=bool(encode_prompt(fmt, tokenizer, "")))
        turns = prompt_format_turns(fmt, tokenizer.eos_token or "")
    embeddings = config.vocab_size
    vocab = gguf_vocab(tokenizer, embeddings, template)
    bos = tokenizer.bos_token if vocab.special.add_special_token.get("bos") else None
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    return GGUFPlan(reg, version, quantize, vocab, template, ollama_template(tokenizer, template, bos, turns),
                    stops)
