"""What a version is: its manifest (format, id, lineage, files with checksums) and the checks against it.

``manifest.json`` is the last file written into a version folder. It lists every other file with its size and
sha256; the version ``id`` is the sha256 of the canonical manifest without the id itself, so the same id names
the same bytes everywhere. :func:`check_version_dir` compares a folder with its manifest: cheaply (sizes and
the manifest's own hash, on every load) or in full (every byte re-hashed, ``finetune versions verify``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import sys
from importlib import metadata as _importlib_metadata
from pathlib import Path
from typing import Any, cast

from .. import atomic
from ..errors import IntegrityError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SOFTWARE = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "finetune")


def utc_now() -> str:
    """Timestamps everywhere: UTC, ISO 8601, microseconds, with a Z."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def software_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a version's files, recorded in every manifest."""
    return dict(_software_versions())


@functools.lru_cache(maxsize=1)
def _software_versions() -> dict[str, str]:
    # Reading package metadata is most of a small publish's time (BENCHMARKS.md); it cannot change under a
    # running process in any way that matters (the imported modules stay what they were).
    out = {"python": sys.version.split()[0]}
    for pkg in _SOFTWARE:
        try:
            out[pkg] = _importlib_metadata.version(pkg)
        except _importlib_metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def manifest_id(manifest: dict[str, Any]) -> str:
    """The version id: sha256 of the canonical manifest without its ``id`` field."""
    body = {k: v for k, v in manifest.items() if k != "id"}
    return hashlib.sha256(atomic.canonical_json(body)).hexdigest()


class Version:
    """One published, immutable version. The manifest is read on first use."""

    def __init__(self, model: str, number: int, path: Path | str, manifest: dict[str, Any] | None = None):
        self.model = model
        self.number = number
        self._path = path  # a listing of 100,000 versions hands plain strings: a Path is made on first use
        self._manifest = manifest

    @property
    def path(self) -> Path:
        if not isinstance(self._path, Path):
            self._path = Path(self._path)
        return self._path

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            self._manifest = read_manifest(self.path)
        return self._manifest

    @property
    def id(self) -> str:
        return cast(str, self.manifest["id"])

    @property
    def ref(self) -> str:
        return f"{self.model}:{self.number}"

    @property
    def kind(self) -> str:
        return cast(str, self.manifest.get("kind", "files"))

    @property
    def parent(self) -> dict[str, Any] | None:
        return self.manifest.get("parent")

    @property
    def metadata(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.manifest.get("metadata", {}))

    @property
    def created_at(self) -> str:
        return cast(str, self.manifest.get("created_at", ""))

    def __repr__(self) -> str:
        return f"Version({self.ref!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and (self.model, self.number) == (other.model, other.number)

    def __hash__(self) -> int:
        return hash((self.model, self.number))


def read_manifest(version_dir: Path) -> dict[str, Any]:
    """Read and minimally check a manifest; a damaged one is an :class:`IntegrityError`."""
    path = version_dir / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing", damaged_hint(version_dir)) from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(
            f"{path} is not valid JSON (line {getattr(err, 'lineno', '?')})", damaged_hint(version_dir)
        ) from None
    if not isinstance(manifest, dict) or not {"id", "number", "model", "files"} <= manifest.keys():
        raise IntegrityError(f"{path} lacks required fields", damaged_hint(version_dir))
    return manifest


def damaged_hint(version_dir: Path) -> str:
    """What to do about a damaged version folder ``ROOT/models/OWNER/NAME/versions/N``: commands that work on it."""
    parts = version_dir.parts
    ref = f"{parts[-4]}/{parts[-3]}:{parts[-1]}" if len(parts) >= 4 else "REF"
    return (f"the version is damaged: `finetune versions verify {ref}` lists what is wrong, "
            f"`finetune versions delete {ref}` removes it")


def check_version_dir(path: Path, full: bool) -> list[str]:
    """Compare a version folder with its manifest. ``full`` re-hashes every byte; otherwise sizes only."""
    try:
        manifest = read_manifest(path)
    except IntegrityError as err:
        return [err.message]
    problems = []
    if manifest_id(manifest) != manifest.get("id"):
        problems.append(f"{MANIFEST}: content does not match its id {str(manifest.get('id'))[:16]}")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return problems + [f"{MANIFEST}: 'files' is not a mapping"]
    for rel, info in sorted(files.items()):
        # A tampered manifest must not make us read outside the version folder, nor crash on a malformed entry.
        if not isinstance(info, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: malformed manifest entry")
            continue
        p = path / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if size != info.get("size"):
            problems.append(f"{rel}: size {size} bytes, manifest says {info.get('size')}")
        elif full and atomic.sha256_file(p) != info.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest")
    if full:
        for dirpath, _, filenames in os.walk(path):
            for name in filenames:
                rel = (Path(dirpath).relative_to(path) / name).as_posix()
                if rel != MANIFEST and rel not in files:
                    problems.append(f"{rel}: extra file not in the manifest")
    return problems
