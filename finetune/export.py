"""Exporting a version out of the registry, for tools that know nothing of finetune.

* ``adapter``: the PEFT folder as published (``adapter_config.json``, ``adapter_model.safetensors``, the model
  card and loss curve); load it with ``peft.PeftModel.from_pretrained(base, folder)``.
* ``merged``: the adapter merged into its base, saved as a standard Hugging Face model folder (safetensors,
  config, tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads without peft.
* ``gguf``: the merged model as one GGUF file (f16 or q8_0) with its tokenizer and prompt template, and an Ollama
  ``Modelfile`` beside it (:mod:`finetune.export_gguf`).

An export is written beside ``OUT_DIR`` and renamed into place, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from .atomic import remove_tree, rename_noreplace
from .errors import AlreadyExistsError, RegistryAccessError, UsageError
from .registry import Registry, Version
from .registry.manifest import MANIFEST

FORMATS = ("adapter", "merged", "gguf")
_SAVE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def export(
    reg: Registry,
    ref: str,
    out_dir: str | os.PathLike[str],
    format: str = "adapter",
    dtype: str = "auto",
    quantize: str | None = None,
) -> Path:
    """Write version ``ref`` to the new (or empty) folder ``out_dir`` as ``format``; returns the folder.

    ``dtype`` applies to ``merged``: the weights are merged in fp32 on the CPU, then saved in the base model's
    own dtype (``auto``) or the one given. ``quantize`` applies to ``gguf``: ``f16`` (the default) or ``q8_0``.
    """
    if format not in FORMATS:
        raise UsageError(f"unknown export format {format!r}", f"use one of: {', '.join(FORMATS)}")
    if dtype not in _SAVE_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", f"use one of: {', '.join(_SAVE_DTYPES)}")
    if not os.fspath(out_dir).strip():  # Path("") is the current folder: never what an empty argument meant
        raise UsageError("the export folder is empty", "give the new or empty folder to write the export into")
    if quantize is not None and format != "gguf":
        raise UsageError(f"quantize applies to GGUF exports, not to format {format}", "use --format gguf")
    if format == "gguf" and dtype != "auto":
        raise UsageError("dtype applies to merged exports; a GGUF export takes --quantize f16|q8_0")
    out = Path(out_dir).expanduser().absolute()
    if reg.contains(out):  # a folder there would pass for a version (or a model) without a manifest
        raise UsageError(f"{out} is inside the registry at {reg.root}", "export to a folder outside the registry")
    _check_target(out)
    if format == "adapter":
        from .inference import verify_adapter

        version = reg.resolve(ref)
        if version.kind != "adapter":
            raise UsageError(f"{version.ref} is a {version.kind} version and holds no adapter",
                             "export it with --format merged")
        verify_adapter(reg, version)  # the base is not needed for the adapter's own files
        return _write_atomically(out, lambda stage: _copy_adapter(version, stage))
    if format == "gguf":
        from .gguf_files import plan_gguf

        plan = plan_gguf(reg, ref, quantize or "f16")  # refuses what it cannot convert, before any weight is read
        return _write_atomically(out, plan.write)
    return _write_atomically(out, lambda stage: _save_merged(reg, ref, stage, dtype))


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlreadyExistsError(f"{out} exists and is not an empty folder", "choose a new or empty output folder")


def _write_atomically(out: Path, write: Any) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.export-{os.getpid()}-{os.urandom(4).hex()}"
        stage.mkdir()
    except OSError as err:
        raise RegistryAccessError(f"cannot write to {out.parent}: {err.strerror}",
                                  "check the path and permissions") from None
    try:
        write(stage)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty target is accepted; rename_noreplace needs it gone
        try:
            rename_noreplace(stage, out)
        except FileExistsError:
            raise AlreadyExistsError(f"{out} appeared while exporting", "choose a new or empty output folder") from None
    finally:
        remove_tree(stage)
    return out


def _copy_adapter(version: Version, stage: Path) -> None:
    for rel in sorted(version.manifest["files"]):
        if rel == MANIFEST:
            continue
        (stage / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(version.path / rel, stage / rel)  # copyfile: the copy is the user's, not read-only


def _save_merged(reg: Registry, ref: str, stage: Path, dtype: str) -> None:
    import torch

    from .inference import load_version
    from .modeling.precision import torch_dtype

    loaded = load_version(reg, ref, device="cpu", merge=True, precision="fp32")
    model = loaded.model
    target = _saved_dtype(loaded) if dtype == "auto" else torch_dtype(dtype)
    if target != torch.float32:
        model = model.to(target)
    model.save_pretrained(str(stage), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(stage))
    (stage / "README.md").write_text(_merged_card(loaded.version, loaded.resolved.base.description, str(target)),
                                     encoding="utf-8")


def _saved_dtype(loaded: Any) -> Any:
    """The dtype the base model's files hold (the loaded copy is fp32 for an exact merge)."""
    import torch
    from transformers import AutoConfig

    base = loaded.resolved.base
    try:
        config = AutoConfig.from_pretrained(base.load_path, revision=base.revision)
    except (OSError, ValueError):
        return torch.float32
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32


def _merged_card(version: Version, base: str, dtype: str) -> str:
    meta = version.metadata
    fmt = (meta.get("prompt_format") or {}).get("name") or "text (base model)"
    data = (meta.get("dataset") or {}).get("path") or "-"
    what = (f"The LoRA adapter of `{version.ref}` (id `{version.id[:12]}`) merged into its base `{base}`"
            if version.kind == "adapter" else f"The base model `{version.ref}` (id `{version.id[:12]}`)")
    lines = [
        f"# {version.ref} (merged)",
        "",
        f"{what}, saved in {dtype.replace('torch.', '')}. Exported by finetune.",
        "",
        f"- trained on: `{data}`",
        f"- prompt format: `{fmt}` (format prompts the same way at inference)",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
    ]
    card = version.path / "README.md"
    if version.kind == "adapter" and card.is_file():
        lines += ["## The adapter's model card", "", card.read_text(encoding="utf-8")]
    return "\n".join(lines)
