"""Comparing versions: lineage, data and config side by side, eval loss on one file, answers to the same prompts.

Eval loss is only comparable when every version sees the same tokens. So the eval file is encoded once, with
the first version's prompt format and tokenizer (and its max_seq_len / train_on_inputs), and those token ids are
reused for every version; versions built on different bases (hence possibly different tokenizers) are refused.
Versions are loaded one at a time, so comparing many costs the memory of one.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .registry import Registry, Version

if TYPE_CHECKING:
    from .generation import GenerationSettings
    from .inference import LoadedVersion


@dataclass
class VersionReport:
    """One compared version: where it came from, what changed against the reference, how it scores and answers."""

    version: Version
    # dotted key -> (the reference's value, this version's value); None for a base version (no training config)
    config_changes: dict[str, tuple[Any, Any]] | None
    eval_loss: float | None = None
    answers: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    """The result of :func:`compare_versions`; ``prompts`` are display texts, in the order of ``answers``."""

    reports: list[VersionReport]
    reference: str | None = None  # the version whose config the others are diffed against: the first trained one
    prompts: list[str] = field(default_factory=list)
    eval_file: str | None = None
    eval_rows: int = 0
    eval_label_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Everything compared, as plain JSON-able data (``finetune versions compare --json``)."""
        return {
            "reference": self.reference, "eval_file": self.eval_file, "eval_rows": self.eval_rows,
            "eval_label_tokens": self.eval_label_tokens, "prompts": self.prompts,
            "versions": [{
                "ref": r.version.ref, "id": r.version.id, "kind": r.version.kind, "parent": r.version.parent,
                "dataset": r.version.metadata.get("dataset"), "eval_loss": r.eval_loss, "answers": r.answers,
                "config_changes": None if r.config_changes is None else
                {k: {"from": a, "to": b} for k, (a, b) in r.config_changes.items()},
            } for r in self.reports],
        }


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"train.lr": 0.0002, ...}``; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(first: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose value differs between two configs; a key one config lacks shows as ``None`` there."""
    a, b = flatten(first), flatten(other)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _check_same_base(reg: Registry, versions: list[Version]) -> None:
    from .registry.sources import resolve_model

    bases = [resolve_model(reg, v.ref).base for v in versions]
    first = bases[0].to_dict()
    for version, base in zip(versions[1:], bases[1:]):
        if base.to_dict() != first:
            raise UsageError(
                f"cannot compare eval loss: {versions[0].ref} is built on {bases[0].description}, "
                f"{version.ref} on {base.description}, so their tokenizers may differ",
                "compare versions of one base, or leave out --eval",
            )


def _eval_examples(loaded: LoadedVersion, path: str) -> list[dict[str, list[int]]]:
    """The eval file as token ids and labels, encoded with ``loaded``'s format, tokenizer and data settings."""
    from .config import DataConfig, TrainConfig
    from .data.prepare import prepare

    config = loaded.version.metadata.get("config") or {}
    data_cfg, train_cfg = config.get("data") or {}, config.get("train") or {}
    defaults_data, defaults_train = DataConfig(path="-"), TrainConfig()
    fmt = (loaded.version.metadata.get("prompt_format") or {}).get("name") or "auto"  # a base: as the file reads
    prepared = prepare(
        path, fmt, loaded.tokenizer,
        max_seq_len=data_cfg.get("max_seq_len", defaults_data.max_seq_len),
        train_on_inputs=train_cfg.get("train_on_inputs", defaults_train.train_on_inputs),
        overlong="truncate",
    )
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in prepared.train]


def eval_loss(loaded: LoadedVersion, examples: Sequence[dict[str, list[int]]], batch_size: int = 8) -> float:
    """Mean token cross-entropy of ``loaded.model`` over ``examples`` (summed token loss / label tokens)."""
    import torch

    from .data.batching import collate_padded, pad_id
    from .modeling.ops.loss import CausalLMLoss

    loss_model = CausalLMLoss(loaded.model)
    pad = pad_id(loaded.tokenizer)
    # Similar lengths together waste less padding; the sums do not depend on the order.
    ordered = sorted(examples, key=lambda ex: len(ex["input_ids"]))
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = collate_padded(ordered[start:start + batch_size], pad)
            loss_sum, count = loss_model(**{k: v.to(loaded.device) for k, v in batch.items()})
            total += torch.stack([loss_sum.double().cpu(), count.double().cpu()])
    return float(total[0] / total[1].clamp(min=1))


def _prompt_label(record: dict[str, Any]) -> str:
    fields = {k: v for k, v in record.items() if v is not None}
    if isinstance(fields.get("prompt"), str):
        return fields["prompt"]
    if isinstance(fields.get("instruction"), str):
        return fields["instruction"] + (f" [input: {fields['input']}]" if fields.get("input") else "")
    messages = fields.get("prompt") or fields.get("messages") or []
    return " | ".join(str(m.get("content")) for m in messages if isinstance(m, dict))


def compare_versions(
    reg: Registry,
    refs: Sequence[str],
    prompts_file: str | None = None,
    eval_file: str | None = None,
    settings: GenerationSettings | None = None,
    device: str = "auto",
    prompt_records: Sequence[dict[str, Any]] | None = None,
    max_eval_rows: int | None = None,
    on_version: Callable[[Comparison, int], None] | None = None,
) -> Comparison:
    """Compare versions: config changes against the first, eval loss on ``eval_file``, answers to the prompts of
    ``prompts_file`` (records with ``prompt``, or ``instruction``/``input``: see
    :func:`finetune.inference.load_prompts`) or of ``prompt_records`` (the same records, given directly).

    Models are loaded only when there is an eval file or prompts to run. ``max_eval_rows`` bounds the rows of the
    eval file scored (a larger file is refused; the web app's comparisons set it). ``on_version(comparison, done)``
    is called each time one more version has been scored and has answered (the web app shows progress with it).
    """
    if len(refs) < 2:
        raise UsageError("compare needs at least two versions", "give two or more REFs")
    versions = [reg.resolve(ref) for ref in refs]
    trained = [v for v in versions if v.metadata.get("config")]
    reference = trained[0] if trained else None
    reports = [VersionReport(v, config_changes(reference.metadata["config"], v.metadata["config"])
                             if reference is not None and v in trained else None) for v in versions]
    comparison = Comparison(reports, reference=reference.ref if reference else None, eval_file=eval_file)
    if eval_file is None and prompts_file is None and not prompt_records:
        return comparison
    from .data.batching import label_count
    from .data.records import read_records
    from .inference import generate, load_version, prompt_format_of, prompt_from_record

    if eval_file is not None:
        _check_same_base(reg, versions)
    records = read_records(prompts_file).to_list() if prompts_file is not None else list(prompt_records or [])
    comparison.prompts = [_prompt_label(r) for r in records]
    # Every record is checked against every version's format before the first model loads: a bad one fails fast.
    source = prompts_file or "prompts"
    prompts = [[prompt_from_record(prompt_format_of(v), r, f"{source} record {i}")
                for i, r in enumerate(records, 1)] for v in versions]
    examples = None
    for done, (report, version_prompts) in enumerate(zip(reports, prompts), 1):
        loaded = load_version(reg, report.version.ref, device=device)
        if eval_file is not None:
            if examples is None:
                examples = _eval_examples(loaded, eval_file)
                if max_eval_rows is not None and len(examples) > max_eval_rows:
                    raise UsageError(f"the eval file has {len(examples):,} rows; a comparison here takes at most "
                                     f"{max_eval_rows:,}", "score a smaller file, or compare with "
                                                           "`finetune versions compare --eval`")
                comparison.eval_rows = len(examples)
                comparison.eval_label_tokens = sum(label_count(ex["labels"]) for ex in examples)
            report.eval_loss = eval_loss(loaded, examples)
        report.answers = [generate(loaded, p, settings) for p in version_prompts]
        del loaded
        gc.collect()  # one model in memory at a time
        if on_version is not None:
            on_version(comparison, done)
    return comparison

