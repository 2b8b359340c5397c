"""The versions an inference worker keeps loaded: one base model per base, each version's adapter beside it.

A fine-tune is a LoRA adapter on a base. Versions of one base therefore share that base's weights: the first
adapter wraps the base in a ``peft.PeftModel``, later ones are added with ``load_adapter`` under their own
names, and a batch picks its adapter per row (``set_adapter``, or PEFT's ``adapter_names`` for mixed rows).
Nothing is merged, so a base held once serves any number of versions.

The cache is least-recently-used with a memory budget (bytes of weights: a base counts once, each adapter its
own): after a load, the least recently used versions not in use are dropped until the total fits, and a base
goes when its last version does. Loading checks what it loads exactly as ``finetune.load`` does
(:func:`finetune.inference.resolve_version`: the adapter re-hashed in full, the base's manifest).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, one_line
from ..loading import (
    LoadedVersion,
    _load_base,
    eos_ids,
    inference_precision,
    prompt_format_of,
    resolve_device,
    resolve_version,
)
from ..modeling.context import context_length
from ..modeling.precision import torch_dtype
from ..registry import Registry, Version
from ..registry.sources import ResolvedModel
from .lora import ActiveAdapter, can_restore, install, merge_in_place, restore_base_weights, route_to_base_layers

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def base_key(resolved: ResolvedModel) -> str:
    """What identifies a base in memory: where it loads from, at which revision. An adapter that PEFT cannot
    batch with others (:func:`batches_alone`) gets a base of its own, so it never shares a batch."""
    base = resolved.base
    key = f"{base.load_path}@{base.revision or ''}"
    if resolved.adapter is not None and batches_alone(resolved.adapter.path):
        key += f"#alone:{resolved.adapter.id}"
    return key


def batches_alone(adapter_dir: Any) -> bool:
    """Whether PEFT refuses to mix this adapter's rows with other adapters' in one batch (``adapter_names``):
    DoRA layers, and layers trained whole (``modules_to_save``), whose mixed forward fails on rows of an adapter
    that has no copy of them. Such versions are served with a base of their own (memory for a second copy)."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False  # loading it reports the problem
    return bool(config.get("use_dora") or config.get("modules_to_save"))


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class LoadedBase:
    """One base model in memory and the adapters attached to it."""

    key: str
    model: Any  # the plain model until the first adapter, then the PeftModel wrapping it
    tokenizer: Any
    device: torch.device
    precision: str
    context: int | None  # the model's context length (prompt + generated; modeling.context); None: unknown
    nbytes: int
    source: str = ""  # where the base loads from (a folder: its files restore merged weights exactly)
    adapters: set[str] = field(default_factory=set)
    active: ActiveAdapter = field(default_factory=ActiveAdapter)  # the adapter a uniform batch uses (lora.py)
    merged: str | None = None  # the one adapter merged into the weights in place, while it is the only version
    shared: bool = False  # a second version came: adapters stay unmerged from then on (no merge/restore churn)

    @property
    def peft(self) -> bool:
        return bool(self.adapters) or hasattr(self.model, "peft_config")


@dataclass
class Servable:
    """A version ready to serve: its base in memory, its adapter name there, how to render and stop."""

    version: Version
    base: LoadedBase
    adapter: str  # the PEFT adapter name, or BASE_ADAPTER for a base version
    loaded: LoadedVersion  # what finetune.inference's prompt and eos helpers take
    eos: list[int]
    nbytes: int  # the adapter's own weights (0 for a base version)
    pins: int = 0  # batches using it now; a pinned version is never evicted


def adapter_name(version: Version) -> str:
    return f"v{version.id[:24]}"  # a valid module key: PEFT stores adapters in ModuleDicts


class ModelCache:
    """Loaded versions by id, least recently used first, within ``budget_bytes`` (None: no limit)."""

    def __init__(self, registry: Registry, device: str = "auto", precision: str = "auto",
                 budget_bytes: int | None = None):
        self.registry = registry
        self.device = device
        self.precision = precision
        self.budget_bytes = budget_bytes
        self._versions: OrderedDict[str, Servable] = OrderedDict()  # version id -> servable, LRU first
        self._bases: dict[str, LoadedBase] = {}
        self._lock = threading.RLock()
        self.loads = 0  # versions loaded (adapters attached or base versions opened) since start
        self.base_loads = 0  # base models read from disk since start
        self.evictions = 0

    # ------------------------------------------------------------------ accounting
    def stats(self) -> dict[str, Any]:
        """The cache's own accounting: what is held and how many bytes of weights that is."""
        with self._lock:
            return {
                "bases": len(self._bases),
                "versions": len(self._versions),
                "base_bytes": sum(b.nbytes for b in self._bases.values()),
                "adapter_bytes": sum(s.nbytes for s in self._versions.values()),
                "bytes": self._total(),
                "budget_bytes": self.budget_bytes,
                "loads": self.loads,
                "base_loads": self.base_loads,
                "evictions": self.evictions,
                "base_objects": len({id(b.model) for b in self._bases.values()}),
            }

    def _total(self) -> int:
        return sum(b.nbytes for b in self._bases.values()) + sum(s.nbytes for s in self._versions.values())

    def loaded_refs(self) -> list[str]:
        """The refs (owner/name:N) of the versions held now."""
        with self._lock:
            return [s.version.ref for s in self._versions.values()]

    def cached(self, version_id: str) -> bool:
        with self._lock:
            return version_id in self._versions

    # ------------------------------------------------------------------ use
    def acquire(self, ref: str, log: Any = None) -> tuple[Servable, bool]:
        """The servable for ``ref`` (loading it when needed), pinned until :meth:`release`; and whether it loaded.

        ``log(text)`` receives what loading did, for the prediction's logs.
        """
        say = log or (lambda text: None)
        version = self.registry.resolve(ref)
        with self._lock:
            servable = self._versions.get(version.id)
            if servable is not None:
                self._versions.move_to_end(version.id)
                servable.pins += 1
                return servable, False
            started = time.perf_counter()
            servable = self._load(version, say)
            servable.pins += 1
            self._versions[version.id] = servable
            self.loads += 1
            say(f"loaded {version.ref} in {time.perf_counter() - started:.2f}s")
            self._evict(say)
            return servable, True

    def release(self, servable: Servable) -> None:
        with self._lock:
            servable.pins = max(0, servable.pins - 1)

    # ------------------------------------------------------------------ loading
    def _load(self, version: Version, say: Any) -> Servable:
        say(f"loading {version.ref} (not in this worker's cache); verifying its files")
        resolved = resolve_version(self.registry, version.ref)  # re-hashes the adapter, checks the base
        key = base_key(resolved)
        base = self._bases.get(key)
        if base is None:
            base = self._load_base(version, resolved, say)
            self._bases[key] = base
        else:
            say(f"base {resolved.base.description} already in memory (shared)")
            base.shared = True
            if base.merged is not None:
                self._unmerge(base, say)
        if resolved.adapter is None:
            name, nbytes = BASE_ADAPTER, 0
        else:
            name = adapter_name(version)
            nbytes = self._attach(base, name, version, resolved)
            if not base.shared and len(base.adapters) == 1 and can_restore(base.model, base.source):
                merge_in_place(base.model, name)
                route_to_base_layers(base.model, merged=True)
                base.merged = name
                say(f"{version.ref} is the only version of its base here: its adapter is merged into the base "
                    "weights in place (restored exactly when another version comes)")
        tokenizer = base.tokenizer
        trained_template = (version.metadata.get("prompt_format") or {}).get("chat_template")
        if trained_template and trained_template != getattr(tokenizer, "chat_template", None):
            # A shallow copy shares the tokenizer's weights; only this version renders chats with its template.
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = trained_template
        loaded = LoadedVersion(version, resolved, base.model, tokenizer, prompt_format_of(version), base.device,
                               base.precision)
        return Servable(version, base, name, loaded, eos_ids(loaded), nbytes)

    def _load_base(self, version: Version, resolved: ResolvedModel, say: Any) -> LoadedBase:
        target = resolve_device(self.device, self.registry.get_model(version.model).hardware)
        precision = inference_precision(self.precision, target)
        say(f"loading base {resolved.base.description} ({precision} on {target})")
        tokenizer, model = _load_base(resolved, torch_dtype(precision))
        model.to(target)
        model.eval()
        model.requires_grad_(False)
        self.base_loads += 1
        context = context_length(model.config, tokenizer)
        nbytes = _nbytes(model.parameters()) + _nbytes(model.buffers())
        return LoadedBase(base_key(resolved), model, tokenizer, target, precision, context, nbytes,
                          source=resolved.base.load_path)

    def _unmerge(self, base: LoadedBase, say: Any) -> None:
        """Back to unmerged adapters on the exact base weights (a second version of this base is coming)."""
        name = base.merged
        route_to_base_layers(base.model, merged=False)
        try:
            restored = restore_base_weights(base.model, base.source)
            say(f"unmerged the adapter merged into base weights: {restored} weights restored exactly from the files")
        except (OSError, RuntimeError, KeyError) as err:  # the files changed or cannot be read: subtract the delta
            base.model.base_model.unmerge_adapter()
            say(f"unmerged by subtraction ({one_line(err)}): base weights are within rounding of the originals")
        base.merged = None
        if name is not None and base.model.active_adapter != name:
            base.model.set_adapter(name)

    def _attach(self, base: LoadedBase, name: str, version: Version, resolved: ResolvedModel) -> int:
        from peft import PeftModel

        path = str(resolved.adapter.path)
        try:
            if not hasattr(base.model, "peft_config"):
                base.model = PeftModel.from_pretrained(base.model, path, adapter_name=name, is_trainable=False)
            else:
                base.model.load_adapter(path, adapter_name=name, is_trainable=False)
        except Exception as err:  # peft and safetensors raise many types; all mean the adapter is unusable
            raise ModelLoadError(f"cannot load the adapter of {version.ref}: {one_line(err)}",
                                 f"run `finetune versions verify {version.ref}`") from None
        base.model.to(base.device)
        base.model.eval()
        base.model.requires_grad_(False)
        install(base.model, base.active)  # the new adapter's layers too (layers patched before are kept)
        base.adapters.add(name)
        marker = f".{name}."
        return _nbytes(p for n, p in base.model.named_parameters() if marker in n)

    # ------------------------------------------------------------------ eviction
    def _evict(self, say: Any) -> None:
        if self.budget_bytes is None:
            return
        for vid in list(self._versions):  # least recently used first
            if self._total() <= self.budget_bytes:
                return
            servable = self._versions[vid]
            if servable.pins:
                continue
            self._drop(vid, servable)
            say(f"evicted {servable.version.ref} from the cache (memory budget)")

    def _drop(self, vid: str, servable: Servable) -> None:
        del self._versions[vid]
        self.evictions += 1
        base = servable.base
        if not any(s.base is base for s in self._versions.values()):  # its last version: the base goes too
            del self._bases[base.key]
            if base.device.type == "cuda":
                torch.cuda.empty_cache()
        elif servable.adapter != BASE_ADAPTER:
            others = sorted(base.adapters - {servable.adapter})
            if others and base.model.active_adapter == servable.adapter:  # else PEFT switches itself, with a warning
                base.model.set_adapter(others[0])
            base.model.delete_adapter(servable.adapter)  # never the merged one: merged means the only version
            base.adapters.discard(servable.adapter)

    def clear(self) -> None:
        with self._lock:
            for vid, servable in list(self._versions.items()):
                self._drop(vid, servable)
