"""Reading dataset files into rows, with errors that name the file and line.

JSONL, JSON, CSV and Parquet go through ``datasets`` (memory-mapped Arrow, any size); a name that is not a file
but looks like ``owner/name`` is loaded from the hub on machines that are online. ``datasets`` reports a
malformed file without a line number, so on failure the file is re-scanned here to name the first bad line.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError, one_line

EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_records(path: str, label: str | None = None) -> datasets.Dataset:
    """Load a JSONL, JSON, CSV or Parquet file (or, online, a hub dataset ``owner/name``) as one Dataset.

    Errors name the file as ``label`` when given: an uploaded file by the name it was uploaded with, never the
    server path it is stored at."""
    p = Path(path)
    name = label or path
    if not p.exists():
        if _HUB_ID.match(path) and p.suffix.lower() not in EXTENSIONS:
            return _read_hub(path)
        raise DataError(f"dataset file not found: {name}",
                        "upload it again" if label else f"check the path (relative to {os.getcwd()})")
    if p.is_dir():
        raise DataError(f"{name} is a folder, not a dataset file", "point at one .jsonl, .json, .csv or .parquet file")
    kind = EXTENSIONS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"{name}: unsupported file type '{p.suffix}'", "use one of " + ", ".join(EXTENSIONS))
    if p.stat().st_size == 0:
        raise DataError(f"{name} is empty", "add at least one record")
    if kind != "parquet":  # pyarrow reads text columns as unchecked bytes and fails late, with a traceback
        _check_utf8(p, name)
    if p.suffix.lower() == ".jsonl":
        _check_json_lines(p, name)  # datasets turns a line that is a list into a row of its own making
    kwargs: dict[str, Any] = {}
    if kind == "csv":
        # Keep every cell a string ("007" stays "007", "NA" stays "NA"); only empty cells become missing.
        import csv

        with open(p, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        if not any(c.strip() for c in header):
            raise DataError(f"{name} has no header row", "the first line must name the columns")
        kwargs = dict(features=datasets.Features({c: datasets.Value("string") for c in header}),
                      keep_default_na=False, na_values=[""])
    try:
        ds = datasets.load_dataset(kind, data_files=str(p), split="train", **kwargs)
    except Exception as err:  # datasets raises many types, none naming a line; find it ourselves
        if kind == "json":
            _diagnose_json(p, name)
        if "corresponds to no data" in str(err):
            raise DataError(f"{name} has no records", "add at least one record") from err
        why = one_line(err).replace(str(p), name)  # the reader's own words may quote the file's path
        raise DataError(f"{name} cannot be read: {why}", f"check that it is valid {kind.upper()}") from err
    if ds.num_rows == 0:
        raise DataError(f"{name} has no records", "add at least one record")
    return ds


def _check_utf8(p: Path, name: str, chunk_size: int = 1 << 20) -> None:
    """Raise a DataError naming the first line of ``p`` that is not UTF-8 (one streaming pass, any file size)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with open(p, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # err.start counts from the decoder's buffer: the few undecoded bytes of the last chunk, then this one
                line += chunk.count(b"\n", 0, max(0, err.start))
                raise DataError(f"{name}:{line}: not UTF-8 text ({err.reason})",
                                "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
            if not chunk:
                return
            line += chunk.count(b"\n")


def _check_json_lines(p: Path, name: str) -> None:
    """Raise the DataError naming the first line of a JSON lines file that is not an object (one pass)."""
    with open(p, "rb") as f:
        for raw in f:
            head = raw.lstrip()[:1]
            if head and head != b"{":
                _diagnose_json(p, name)
                return


def _read_hub(name: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as err:
        raise DataError(f"no local file '{name}', and the hub dataset of that name cannot be loaded: {one_line(err)}",
                        "give a path to a local file (hub datasets need a machine that is online)") from err
    if ds.num_rows == 0:
        raise DataError(f"hub dataset {name} has no rows in its train split")
    return ds


def _diagnose_json(p: Path, name: str) -> None:
    """Raise a DataError naming the first bad line of a JSON/JSONL file; return if none is found."""
    data = p.read_bytes()
    if data.lstrip()[:1] == b"[" and p.suffix.lower() != ".jsonl":  # a JSON array file; .jsonl is always lines
        try:
            rows = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if isinstance(err, UnicodeDecodeError):
                raise DataError(f"{name}: not UTF-8 text", "save the file as UTF-8") from err
            raise DataError(f"{name}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno})",
                            "fix that line") from err
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise DataError(f"{name}: record {i} is a {type(row).__name__}, not an object",
                                "a .json file must hold a list of objects")
        return
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except UnicodeDecodeError as err:
            raise DataError(f"{name}:{number}: not UTF-8 text", "save the file as UTF-8") from err
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{number}: invalid JSON ({err.msg}, column {err.colno})",
                            "each line must be one complete JSON object") from err
        if not isinstance(row, dict):
            raise DataError(f"{name}:{number}: a JSON {type(row).__name__}, not an object",
                            "each line must be one JSON object")


class RowLocator:
    """Names a row for error messages: ``file.jsonl:7`` for JSON lines, ``file.csv row 7`` otherwise."""

    def __init__(self, path: str, label: str | None = None):
        self.path = path
        self.label = label or path  # how rows are named: an upload by its file name
        self._lines: list[int] | None = None

    def __call__(self, index: int) -> str:
        p = Path(self.path)
        if p.suffix.lower() in (".jsonl", ".json") and p.is_file():
            if self._lines is None:
                data = p.read_bytes()
                # A .json array has no one-row-per-line mapping; JSON lines do (blank lines are skipped).
                self._lines = [] if data.lstrip()[:1] == b"[" else [
                    n for n, raw in enumerate(data.splitlines(), 1) if raw.strip()]
            if index < len(self._lines):
                return f"{self.label}:{self._lines[index]}"
            return f"{self.label} record {index + 1}"
        return f"{self.label} row {index + 1}"
