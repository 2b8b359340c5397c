"""Checking a version's files against the sha256 its manifest recorded, on every load, without re-reading them all.

A flipped byte keeps a file's size, so only a hash finds it; hashing a multi-gigabyte base on every load would
be slow. Each file that matched its manifest is remembered under ``ROOT/cache/hashes/`` with its stat
stamp (inode, size, modification and change times): while the stamp is unchanged the file is not read again.
Any write to a file moves its change time (which no user call can set back), so a changed file is always
re-hashed. The cache is derived data: deleting it costs one re-hash; a registry that cannot be written (a
read-only mount) is checked in full every time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import atomic
from ..errors import IntegrityError
from .manifest import MANIFEST, manifest_id, read_manifest

if TYPE_CHECKING:
    from .manifest import Version
    from .store import Registry


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def check_files(reg: Registry, key: str, folder: Path, files: Any) -> list[str]:
    """One line per file of ``files`` (``{relative path: {size, sha256}}``) that is missing or differs in
    ``folder``; files unchanged since they last matched (the cache entry ``key``) are not read again."""
    if not isinstance(files, dict):
        return [f"{MANIFEST}: 'files' is not a mapping"]
    # Named by a hash: ``key`` comes from a manifest, which must never choose a path.
    cache_path = reg.cache_dir("hashes") / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.json"
    cached = _read_cache(cache_path, folder)
    verified: dict[str, str] = {}
    problems = []
    for rel, info in sorted(files.items()):
        # A tampered manifest must not make us read outside the folder, nor crash on a malformed entry.
        if not isinstance(info, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: malformed manifest entry")
            continue
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if st.st_size != info.get("size"):
            problems.append(f"{rel}: size {st.st_size} bytes, manifest says {info.get('size')}")
            continue
        stamp = _stamp(st)
        if cached.get(rel) != stamp:
            try:
                digest = atomic.sha256_file(path)
            except OSError as err:
                problems.append(f"{rel}: unreadable ({err.strerror or err})")
                continue
            if digest != info.get("sha256"):
                problems.append(f"{rel}: sha256 differs from the manifest")
                continue
        verified[rel] = stamp
    if verified != cached:
        _write_cache(reg, cache_path, folder, verified)
    return problems


def check_version_files(reg: Registry, version: Version) -> list[str]:
    """What :meth:`Registry.check` finds: the manifest's own hash, then every file's size and sha256 (cached)."""
    try:
        manifest = read_manifest(version.path)
    except IntegrityError as err:
        return [err.message]
    problems = []
    if manifest_id(manifest) != manifest.get("id"):
        problems.append(f"{MANIFEST}: content does not match its id {str(manifest.get('id'))[:16]}")
    return problems + check_files(reg, str(manifest.get("id")), version.path, manifest.get("files"))


def _read_cache(path: Path, folder: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("folder") != str(folder) or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, str)}


def _write_cache(reg: Registry, path: Path, folder: Path, verified: dict[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.replace_file(path, atomic.pretty_json({"folder": str(folder), "files": verified}), reg.layout.staging)
    except OSError:
        pass  # a read-only or full registry: the next load hashes again, which is slower, never wrong
