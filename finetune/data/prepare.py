"""Preparing a dataset for training: read, encode in its prompt format, split off an eval set, cache.

The tokenized splits are cached in the registry's cache (keyed by data, tokenizer and settings), memory-mapped
through ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..atomic import canonical_json, remove_tree, rename_noreplace, sha256_file
from ..choices import FORMATS, OVERLONG
from ..errors import DataError, UsageError, one_line
from .formats import IGNORE_INDEX, _check_columns, _encode_many, detect_format
from .records import RowLocator, read_records

# Bump whenever encoding rules change: old cache entries then stop matching instead of serving stale ids.
CACHE_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides token ids: vocabulary, merges, normalizers, chat template, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time state that transformers leaves behind; ids do not depend on it
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    ident = {"tokenizer": spec, "chat_template": getattr(tokenizer, "chat_template", None), "special": special,
             "class": type(tokenizer).__name__}
    return hashlib.sha256(canonical_json(ident)).hexdigest()


def dataset_fingerprint(path: str, records: datasets.Dataset | None = None) -> str:
    """sha256 of a local file's bytes; for a hub dataset, ``hub:<id>@<datasets fingerprint>``."""
    if Path(path).is_file():
        return sha256_file(Path(path))
    records = records if records is not None else read_records(path)
    return f"hub:{path}@{records._fingerprint}"


@dataclass(frozen=True)
class Prepared:
    """Tokenized splits (columns input_ids, labels, length; source row order) and what went into them."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    info: dict


_FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "length": datasets.Value("int32"),
    "raw_length": datasets.Value("int32"),
    "learned": datasets.Value("int32"),
})


def _map_batch(batch: dict[str, list], indices: list[int], *, fmt: str, tokenizer: Any, train_on_inputs: bool,
               max_seq_len: int, where: RowLocator) -> dict[str, list]:
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: dict[str, list] = {k: [] for k in _FEATURES}
    for ids, labels in _encode_many(records, fmt, tokenizer, train_on_inputs, lambda j: where(indices[j])):
        out["raw_length"].append(len(ids))
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["learned"].append(sum(1 for t in labels if t != IGNORE_INDEX))
    return out


def _encode_dataset(records: datasets.Dataset, path: str, fmt: str, tokenizer: Any, train_on_inputs: bool,
                    max_seq_len: int, overlong: str, fingerprint: str, label: str | None = None) -> datasets.Dataset:
    where = RowLocator(path, label)
    # No num_proc: it showed no gain (BENCHMARKS.md): the Rust tokenizer already spreads a batch over threads, and
    # forking and pickling eat the rest. Re-measure before adding it.
    encoded = records.map(
        _map_batch, batched=True, batch_size=1000, with_indices=True, remove_columns=records.column_names,
        features=_FEATURES, keep_in_memory=True, new_fingerprint=fingerprint, desc="tokenizing",
        fn_kwargs=dict(fmt=fmt, tokenizer=tokenizer, train_on_inputs=train_on_inputs, max_seq_len=max_seq_len,
                       where=where))
    if overlong == "error":
        refuse_overlong(encoded, max_seq_len, where)
    return encoded


def refuse_overlong(encoded: datasets.Dataset, max_seq_len: int, where: Any) -> None:
    """With ``overlong: error``: a DataError naming the first row whose tokens (its ``raw_length`` column)
    exceed ``max_seq_len``, and how many do."""
    raw = encoded.data.column("raw_length").to_numpy()
    over = np.flatnonzero(raw > max_seq_len)
    if over.size:
        i = int(over[0])
        raise DataError(f"{where(i)}: {int(raw[i])} tokens, longer than max_seq_len {max_seq_len} "
                        f"({over.size} row{'s are' if over.size != 1 else ' is'})",
                        "raise max_seq_len, shorten the row, or set overlong: truncate")


def info_truncated(encoded: datasets.Dataset, max_seq_len: int) -> bool:
    """Whether any encoded row was longer than ``max_seq_len`` (kept or dropped)."""
    return bool((encoded.data.column("raw_length").to_numpy() > max_seq_len).any())


def _eval_spec(eval: float | int | str | None) -> tuple[str, Any] | None:
    """('fraction', f) | ('rows', n) | ('file', path) | None; a numeric string counts as a number."""
    if isinstance(eval, str) and re.fullmatch(r"\s*\d*\.?\d+\s*", eval):
        eval = float(eval) if "." in eval else int(eval)
    if eval is None or isinstance(eval, str):
        return eval and ("file", eval)
    if isinstance(eval, float) and 0 < eval < 1:
        return ("fraction", eval)
    if isinstance(eval, int) and not isinstance(eval, bool) and eval >= 1:
        return ("rows", eval)
    raise UsageError(f"eval must be a fraction in (0, 1), a row count or a file path, got {eval!r}")


def _split(n: int, spec: tuple[str, Any], seed: int, path: str) -> tuple[np.ndarray, np.ndarray]:
    n_eval = max(1, round(spec[1] * n)) if spec[0] == "fraction" else spec[1]
    if n_eval >= n:
        raise DataError(f"{path}: {n} rows cannot give {n_eval} eval rows and keep any for training",
                        "use a smaller eval share or a separate eval file")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def _keep(encoded: datasets.Dataset, rows: np.ndarray) -> tuple[datasets.Dataset, dict]:
    """Rows with something to learn (in source order), and counts: truncated, dropped, tokens, label tokens."""
    column = lambda name: encoded.data.column(name).to_numpy()[rows]  # noqa: E731 - arrow, not row-by-row
    learned, length = column("learned"), column("length")
    kept = learned > 0
    subset = encoded.select(rows[kept].tolist()).remove_columns(["raw_length", "learned"])
    return subset, {"truncated": int(((column("raw_length") > length) & kept).sum()), "dropped": int((~kept).sum()),
                    "tokens": int(length[kept].sum()), "label_tokens": int(learned.sum())}


def prepare(path: str, fmt: str, tokenizer: Any, *, max_seq_len: int, train_on_inputs: bool,
            overlong: str = "truncate", eval: float | int | str | None = None, seed: int = 42,
            cache_dir: str | None = None, labels: Mapping[str, str] | None = None) -> Prepared:
    """Read, encode, split and (with ``cache_dir``) cache a dataset; see :class:`Prepared`.

    ``labels`` names files otherwise than by their path, in errors and in ``info["path"]``/``["eval_path"]``:
    an uploaded file by the name it was uploaded with (``{server path: "bad.jsonl"}``), so that nothing a
    version or a training shows holds a path of the server."""
    labels = labels or {}
    name = labels.get(path, path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown data format '{fmt}'", "use one of " + ", ".join(FORMATS))
    if overlong not in OVERLONG:
        raise UsageError(f"overlong must be one of {', '.join(OVERLONG)}, got '{overlong}'")
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise UsageError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    spec = _eval_spec(eval)
    local = Path(path).is_file()
    records = None if local else read_records(path)
    source = dataset_fingerprint(path, records)
    eval_source = dataset_fingerprint(spec[1]) if spec and spec[0] == "file" else None
    tok_sha = tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(canonical_json({
        "v": CACHE_VERSION, "data": source, "tokenizer": tok_sha, "format": fmt, "max_seq_len": max_seq_len,
        "overlong": overlong, "train_on_inputs": bool(train_on_inputs), "seed": seed,
        "eval": None if spec is None else [spec[0], eval_source if spec[0] == "file" else spec[1]],
    })).hexdigest()
    here = {"path": labels.get(path) or (str(Path(path).resolve()) if local else path)}
    eval_name = labels.get(spec[1], spec[1]) if spec and spec[0] == "file" else None
    if eval_source is not None:
        here.update(eval_path=labels.get(spec[1]) or (str(Path(spec[1]).resolve()) if Path(spec[1]).is_file()
                                                      else spec[1]), eval_sha256=eval_source)
    entry = Path(cache_dir) / key if cache_dir else None
    if entry is not None and (entry / "info.json").is_file():
        try:
            return _load(entry, {**json.loads((entry / "info.json").read_text()), **here, "cache_hit": True})
        except Exception as err:  # derived data: a damaged entry is set aside and rebuilt, never trusted
            _discard(entry, err)

    records = records if records is not None else read_records(path, name)
    try:
        resolved = detect_format(records.column_names) if fmt == "auto" else fmt
    except DataError as err:
        raise DataError(f"{name}: {err.message}", err.hint) from None
    _check_columns(resolved, records.column_names, name)
    encode = dict(fmt=resolved, tokenizer=tokenizer, train_on_inputs=train_on_inputs, max_seq_len=max_seq_len,
                  overlong=overlong)
    encoded = _encode_dataset(records, path, fingerprint=key[:32], label=name, **encode)
    rows = np.arange(encoded.num_rows)
    eval_set, eval_counts = None, {"truncated": 0, "dropped": 0}
    if eval_source is not None:
        eval_records = read_records(spec[1], eval_name)
        _check_columns(resolved, eval_records.column_names, eval_name)
        eval_encoded = _encode_dataset(eval_records, spec[1], fingerprint=key[32:], label=eval_name, **encode)
        eval_set, eval_counts = _keep(eval_encoded, np.arange(eval_encoded.num_rows))
    elif spec:
        rows, eval_rows = _split(encoded.num_rows, spec, seed, name)
        eval_set, eval_counts = _keep(encoded, eval_rows)
    train, counts = _keep(encoded, rows)
    if info_truncated(encoded, max_seq_len):
        hint = f"raise max_seq_len (now {max_seq_len}) or check that records have something to learn"
    else:
        hint = ("no record was cut short, so the records themselves have nothing to learn: check that each has a "
                "completion (or an assistant turn, with role 'assistant')")
    if train.num_rows == 0:
        raise DataError(f"{name}: no training rows left: all {counts['dropped']} have no label token", hint)
    if eval_set is not None and eval_set.num_rows == 0:
        raise DataError(f"{here.get('eval_path', name)}: no eval rows left after dropping those with no label", hint)
    info = {
        **here, "sha256": source, "rows": encoded.num_rows, "format": resolved,
        "template": "chat_template" if resolved == "messages" else resolved,
        "template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()
        if resolved == "messages" else None,
        "tokenizer_sha256": tok_sha, "max_seq_len": max_seq_len, "train_on_inputs": bool(train_on_inputs),
        "train_rows": train.num_rows, "eval_rows": eval_set.num_rows if eval_set is not None else 0,
        "truncated": counts["truncated"] + eval_counts["truncated"],
        "dropped": counts["dropped"] + eval_counts["dropped"],
        "train_tokens": counts["tokens"], "label_tokens": counts["label_tokens"],
        "cache_key": key, "cache_hit": False,
    }
    if entry is None:
        return Prepared(train, eval_set, info)
    _store(entry, train, eval_set, info)
    return _load(entry, info)  # memory-mapped from the cache, exactly as a later hit will see it


def _load(entry: Path, info: dict) -> Prepared:
    split = lambda name: datasets.load_from_disk(str(entry / name)) if (entry / name).is_dir() else None  # noqa: E731
    prepared = Prepared(split("train"), split("eval"), info)
    if prepared.train is None or prepared.train.num_rows != info.get("train_rows", prepared.train.num_rows):
        raise DataError(f"cache entry {entry} does not hold the {info.get('train_rows')} training rows it lists")
    for ds in (prepared.train, prepared.eval):  # reading the data, not just the header, finds torn Arrow files
        if ds is not None and ds.num_rows:
            ds[ds.num_rows - 1]
    return prepared


def _discard(entry: Path, err: Exception) -> None:
    """Move a damaged cache entry out of the way (it is rebuilt from the data file) and say so."""
    import logging

    logging.getLogger("finetune").warning(
        "tokenized cache entry %s is damaged (%s); rebuilding it (the cache is safe to delete)", entry.name,
        one_line(err))
    aside = entry.parent / f".damaged-{entry.name[:16]}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        entry.rename(aside)
    except OSError:
        return  # another process moved it first; ours rebuilds all the same
    remove_tree(aside)


def _store(entry: Path, train: datasets.Dataset, eval_set: datasets.Dataset | None, info: dict) -> None:
    """Write a cache entry beside its final name and rename it in, so readers never see half of one."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".tmp-{entry.name[:16]}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        train.save_to_disk(str(tmp / "train"))
        if eval_set is not None:
            eval_set.save_to_disk(str(tmp / "eval"))
        (tmp / "info.json").write_text(json.dumps({k: v for k, v in info.items() if k != "cache_hit"}, indent=1))
        rename_noreplace(tmp, entry)
    except FileExistsError:
        pass  # another process cached the same key first; its entry is identical
    finally:
        remove_tree(tmp)


def format_summary(info: dict) -> str:
    """One log line: source, format, rows per split, tokens, truncation, cache."""
    name = Path(info["path"]).name if Path(info["path"]).is_absolute() else info["path"]  # local, or a hub id
    fmt = f"preference pairs ({info['preference']})" if info.get("preference") else info["format"]
    parts = [f"{name}: {info['rows']:,} rows, {fmt}",
             f"train {info['train_rows']:,}" + (f" / eval {info['eval_rows']:,}" if info.get("eval_rows") else ""),
             f"{info['train_tokens']:,} tokens ({info['label_tokens']:,} learned)"]
    if info.get("truncated") or info.get("dropped"):
        parts.append(f"{info['truncated']:,} truncated, {info['dropped']:,} dropped")
    parts.append("cache hit" if info.get("cache_hit") else "tokenized")
    return ", ".join(parts)
