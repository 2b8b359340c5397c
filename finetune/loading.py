"""Loading a version: base + adapter (merged, or the adapter beside the base), and prompts formatted exactly as
its training did. Generating from it is :mod:`finetune.decoding` (the engine), whose public face for Python is
:mod:`finetune.inference`.

A version is loaded through its manifest lineage: the root base (a registry base version, a hub id pinned at a
commit, or a local folder), then the version's own PEFT adapter. Continued fine-tunes keep training one adapter,
so the top version's adapter is the whole fine-tune; the adapters of its ancestors are never stacked.

Nothing is loaded unchecked: the adapter version is re-hashed in full (adapters are small, and a flipped byte
keeps the size the cheap check compares), the base version gets the cheap check (sizes and manifest hash).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .data.formats import alpaca_prompt, encode_prompt, prompt_for
from .data.records import read_records
from .errors import DataError, IntegrityError, ModelLoadError, UsageError, one_line
from .modeling.load import attach_lora, load_base_model, load_tokenizer
from .modeling.precision import choose_precision, torch_dtype
from .names import check_text
from .registry import Registry, Version
from .registry.manifest import check_version_dir
from .registry.sources import ResolvedModel, resolve_model

DEVICES = ("auto", "cpu", "gpu", "cuda")


@dataclass
class LoadedVersion:
    """A version ready for generation: the model (merged, or a PeftModel), its tokenizer, how to format prompts."""

    version: Version
    resolved: ResolvedModel
    model: Any
    tokenizer: Any
    prompt_format: str  # alpaca | prompt_completion | messages | text (a base version takes raw text)
    device: torch.device
    precision: str


# ------------------------------------------------------------------ device and precision
def resolve_device(requested: str, hardware: str = "auto") -> torch.device:
    """The device to run on. ``auto`` follows the model's ``hardware`` setting (auto: a GPU when present)."""
    want = requested
    if requested == "auto":
        want = {"cpu": "cpu", "gpu": "gpu"}.get(hardware, "auto")
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cpu":
        return torch.device("cpu")
    if want in ("gpu", "cuda") or want.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "the model's hardware setting is gpu" if requested == "auto" else f"device {requested!r} was asked"
            raise ModelLoadError(f"no GPU is available, but {why}", "run on a machine with a GPU, or choose device cpu")
        return torch.device("cuda" if want == "gpu" else want)
    raise UsageError(f"unknown device {requested!r}", f"use one of: {', '.join(DEVICES)}, or cuda:N")


def inference_precision(requested: str, device: torch.device) -> str:
    """``auto``: bf16/fp16 on a GPU by capability; fp32 on the CPU, where generation is not worth rounding for."""
    if requested == "auto" and device.type == "cpu":
        return "fp32"
    return choose_precision(requested, device)


# ------------------------------------------------------------------ loading
def _registry(registry: Registry | str | os.PathLike[str] | None) -> Registry:
    return registry if isinstance(registry, Registry) else Registry(registry)


def resolve_version(reg: Registry, ref: str) -> ResolvedModel:
    """A registry ref resolved down to its base, with every file that will be loaded checked."""
    version = reg.resolve(ref)  # unknown models and versions fail here, with the registry's own messages
    resolved = resolve_model(reg, version.ref)
    if version.kind == "adapter":
        verify_adapter(reg, version)
    base = resolved.base.version
    if base is not None and base != version:
        problems = check_version_dir(base.path, full=False)  # Registry.check, but with a hint on restoring a base
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ModelLoadError(f"base model {base.ref} of {version.ref} is damaged: {problems[0]}{more}",
                                 _restore_hint(base))
    return resolved


def verify_adapter(reg: Registry, version: Version) -> None:
    """Re-hash every file of an adapter version; raise :class:`IntegrityError` naming the first problem."""
    problems = reg.verify(version)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityError(f"{version.ref} is damaged: {problems[0]}{more}",
                             f"run `finetune versions verify {version.ref}`; restore it from a backup or retrain it")


def _restore_hint(base: Version) -> str:
    source = base.metadata.get("source", {})
    where = f" (it was imported from {source['path']})" if source.get("path") else ""
    return f"restore the files of {base.ref}{where}; `finetune versions verify {base.ref}` lists what is wrong"


def prompt_format_of(version: Version) -> str:
    """The prompt format a version was trained with; a base version takes raw text."""
    fmt = (version.metadata.get("prompt_format") or {}).get("name")
    return fmt or "text"


def _load_base(resolved: ResolvedModel, dtype: torch.dtype) -> tuple[Any, Any]:
    base = resolved.base
    try:
        return load_tokenizer(base), load_base_model(base, dtype)
    except ModelLoadError as err:
        if os.path.isdir(base.load_path):
            raise  # a local base: its message names the folder
        # A hub base lives in the Hugging Face cache, not in the registry: say how to get it back there.
        at = f" at revision {base.revision}" if base.revision else ""
        flag = f" --revision {base.revision}" if base.revision else ""
        raise ModelLoadError(err.message, f"the base is hub model {base.load_path}{at}; on a machine that is "
                                          f"online, fetch it with `hf download {base.load_path}{flag}`") from None


def load_version(
    reg: Registry,
    ref: str,
    device: str = "auto",
    merge: bool = True,
    precision: str = "auto",
) -> LoadedVersion:
    """Load a version for inference; see :func:`load`. Also returns what :func:`generate` needs."""
    resolved = resolve_version(reg, ref)
    version = resolved.chain[0]
    target = resolve_device(device, reg.get_model(version.model).hardware)
    prec = inference_precision(precision, target)
    tokenizer, model = _load_base(resolved, torch_dtype(prec))
    trained_template = (version.metadata.get("prompt_format") or {}).get("chat_template")
    if trained_template:
        tokenizer.chat_template = trained_template  # render chats exactly as the run that trained this did
    if resolved.adapter is not None:
        try:
            model = attach_lora(model, None, adapter_dir=str(resolved.adapter.path), trainable=False)
        except Exception as err:  # peft and safetensors raise many types; all mean the adapter is unusable
            raise ModelLoadError(f"cannot load the adapter of {version.ref}: {one_line(err)}",
                                 f"run `finetune versions verify {version.ref}`") from None
        if merge:
            model = model.merge_and_unload()
    model.to(target)
    model.eval()
    model.requires_grad_(False)
    return LoadedVersion(version, resolved, model, tokenizer, prompt_format_of(version), target, prec)


def load(
    ref: str,
    device: str = "auto",
    merge: bool = True,
    registry: Registry | str | os.PathLike[str] | None = None,
    precision: str = "auto",
) -> tuple[Any, Any]:
    """Load a registry version as ``(model, tokenizer)``, in eval mode, ready for ``model.generate``.

    ``ref`` is any version reference (``alice/my-model:3``, ``:latest``, an alias, an id prefix). The base comes
    from the version's lineage; a fine-tune's adapter is applied and, with ``merge`` (the default), merged into
    the weights (otherwise the model is a ``peft.PeftModel``). ``device``: ``auto`` follows the model's hardware
    setting, else ``cpu``, ``gpu``/``cuda[:N]``. ``precision``: ``auto`` is bf16/fp16 on a GPU (by capability)
    and fp32 on the CPU. Damaged versions and missing bases raise :class:`~finetune.errors.FinetuneError`.
    """
    loaded = load_version(_registry(registry), ref, device=device, merge=merge, precision=precision)
    return loaded.model, loaded.tokenizer


# ------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class Prompt:
    """One prompt to complete: the user's text (or conversation), or, when ``rendered``, the full prompt text."""

    value: str | list[dict]
    rendered: bool = False
    record: dict[str, Any] | None = None  # the prompts-file line it came from


def prompt_from_record(fmt: str, record: dict[str, Any], where: str) -> Prompt:
    """The prompt in one record of a prompts file: ``prompt``; or ``instruction``/``input`` for alpaca-trained
    versions; or ``messages`` for chat-trained ones."""
    fields = {k: v for k, v in record.items() if v is not None}  # arrow fills absent keys with None
    if "prompt" in fields:
        prompt = fields["prompt"]
        if isinstance(prompt, list) and fmt == "messages":
            return Prompt(prompt, record=record)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string", "give each record a prompt to complete")
        return Prompt(prompt, record=record)
    if "messages" in fields and fmt == "messages":
        return Prompt(fields["messages"], record=record)
    if "instruction" in fields:
        if fmt != "alpaca":
            raise DataError(f"{where}: 'instruction' records fit alpaca-trained versions, not this {fmt}-format one",
                            "give the record a 'prompt' field instead")
        instruction, extra = fields["instruction"], fields.get("input", "")
        if not isinstance(instruction, str) or not instruction.strip() or not isinstance(extra, str):
            raise DataError(f"{where}: 'instruction' must be a non-empty string and 'input' a string")
        # prompt_for takes the instruction alone; an input needs the with-input variant of the template.
        return Prompt(alpaca_prompt(instruction, extra), rendered=True, record=record)
    raise DataError(f"{where}: no 'prompt' field (fields: {sorted(fields)})",
                    "each record needs 'prompt', or 'instruction'/'input' for alpaca-trained versions")


def load_prompts(path: str, fmt: str) -> list[Prompt]:
    """Read a prompts file (JSONL, JSON, CSV or Parquet; one record per prompt) for a version of format ``fmt``."""
    records = read_records(path).to_list()  # refuses a missing, empty or malformed file, naming it
    return [prompt_from_record(fmt, record, f"{path} record {i}") for i, record in enumerate(records, 1)]


def prompt_ids(loaded: LoadedVersion, prompt: Prompt | str | list[dict], system: str | None = None) -> list[int]:
    """Token ids for a prompt, rendered and tokenized exactly as the version's training did."""
    prompt = prompt if isinstance(prompt, Prompt) else Prompt(prompt)
    fmt = loaded.prompt_format
    for text, what in ((prompt.value, "prompt"), (system, "system prompt")):
        if isinstance(text, str):
            check_text(text, what)  # before rendering, so the position named is the user's own
    if prompt.rendered:
        text = prompt.value
    else:
        if isinstance(prompt.value, str) and not prompt.value.strip() and fmt != "text":
            raise UsageError("the prompt is empty", "give the text to complete")
        text = prompt_for(fmt, loaded.tokenizer, prompt.value, system=system)
    assert isinstance(text, str)
    check_text(text, "prompt")  # a conversation's turns
    return encode_prompt(fmt, loaded.tokenizer, text)


def eos_ids(loaded: LoadedVersion) -> list[int]:
    # The tokenizer's eos is what training appended; chat models often end turns with further ids that the
    # model's generation config lists (e.g. an end-of-turn token). Stop at any of them.
    ids = set()
    for value in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)
