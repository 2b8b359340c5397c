"""A model's numbered versions on disk: numbers, the newest one, references and aliases.

:class:`Versions` reads ``models/OWNER/NAME/versions/N`` folders (``Registry`` hands its calls here); publishing
one is :mod:`finetune.registry.publish`, deleting one :mod:`finetune.registry.deletion`. Nothing here reads a
manifest unless asked: a :class:`~finetune.registry.manifest.Version` reads its own on first use, and
:meth:`Versions.listing` gets them through the index (:mod:`finetune.registry.catalog`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import atomic
from ..errors import (
    AmbiguousRefError,
    ConflictError,
    IntegrityError,
    ModelNotFoundError,
    NotFoundError,
    VersionNotFoundError,
)
from ..names import parse_ref
from .aliases import read_aliases
from .catalog import Catalog
from .disk import ensure_writable, listdir, model_lock
from .layout import Layout
from .manifest import MANIFEST, Version, read_manifest
from .models import Model, Models

_STILL_NS = 3_000_000_000  # a versions folder unchanged this long may have its listing remembered
_LATEST_WALK = 256  # numbers `latest` probes one by one before it lists the versions folder instead


class Versions:
    """The versions of one registry's models."""

    def __init__(self, layout: Layout, models: Models, catalog: Catalog):
        self.layout = layout
        self.models = models
        self.catalog = catalog
        self._numbers_cache: dict[Path, tuple[tuple[int, int], tuple[int, ...]]] = {}  # see version_numbers

    # ---------------------------------------------------------------- numbers
    def numbers(self, model_dir: Path) -> list[int]:
        """The numbers of the version folders there are (unsorted)."""
        return [int(e.name) for e in listdir(self.layout.versions_dir(model_dir)) if e.name.isdigit() and e.is_dir()]

    def next_number(self, model_dir: Path) -> int:
        """The model's allocation counter (1 when it has none); a damaged one is an :class:`IntegrityError`."""
        path = self.layout.counter(model_dir)
        try:
            return int(path.read_text().strip())
        except FileNotFoundError:
            return 1
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError(f"{path} is damaged",
                                 "run `finetune registry gc` (it rebuilds the counter from the versions)") from None

    def at(self, model: Model, number: int) -> Version | None:
        path = self.layout.version_dir(model.path, number)
        return Version(model.full_name, number, path) if path.is_dir() else None

    def version_numbers(self, name: str) -> list[int]:
        """See :meth:`Registry.version_numbers`."""
        vdir = self.layout.versions_dir(self.models.get(name).path)
        try:
            st = os.stat(vdir)
        except FileNotFoundError:
            return []
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._numbers_cache.get(vdir)
        if cached is not None and cached[0] == stamp:
            return list(cached[1])
        numbers = sorted(self.numbers(vdir.parent), reverse=True)
        if time.time_ns() - st.st_mtime_ns > _STILL_NS:
            self._numbers_cache[vdir] = (stamp, tuple(numbers))
        return numbers

    # ---------------------------------------------------------------- listings
    def all(self, name: str, limit: int | None = None) -> list[Version]:
        """See :meth:`Registry.list_versions`."""
        m = self.models.get(name)
        numbers = sorted(self.numbers(m.path), reverse=True)[:limit or None]
        return [Version(m.full_name, n, path) for n, path in self.layout.version_dirs(m.path, numbers).items()]

    def listing(self, name: str, limit: int | None = None) -> list[Version]:
        """The newest ``limit`` versions (all by default) with their manifests, unchanged ones from the index."""
        m = self.models.get(name)
        numbers = sorted(self.numbers(m.path), reverse=True)[:limit or None]
        folders = self.layout.version_dirs(m.path, numbers)
        texts = self.catalog.cached("version", name, [str(n) for n in folders],
                                    lambda key: os.path.join(folders[int(key)], MANIFEST), _load_manifest,
                                    complete=not limit)
        out = []
        for n, folder in folders.items():
            text = texts.get(str(n))
            out.append(Version(m.full_name, n, folder, json.loads(text) if text is not None else None))
        return out

    def published_by(self, name: str, training_id: str) -> Version | None:
        try:
            versions = self.all(name)
        except ModelNotFoundError:
            return None
        return next((v for v in versions if v.metadata.get("training_id") == training_id), None)

    def latest(self, m: Model) -> Version | None:
        """The newest version without listing the folder: walk down from the allocation counter."""
        if not self.layout.counter(m.path).exists():
            # No counter: a model never published to (an empty listing), or version folders copied in by hand.
            numbers = self.numbers(m.path)
            return self.at(m, max(numbers)) if numbers else None
        number = self.next_number(m.path) - 1
        # Numbers between the newest version and the counter belong to publishes in progress or crashed;
        # a deleted newest version makes us walk further. Both are rare and short; a long walk (many newest
        # versions deleted, a damaged counter) falls back to one listing rather than a stat per number.
        for _ in range(_LATEST_WALK):
            if number < 1:
                return None
            v = self.at(m, number)
            if v is not None:
                return v
            number -= 1
        below = [n for n in self.numbers(m.path) if n <= number]
        return self.at(m, max(below)) if below else None

    def resolve(self, ref: str) -> Version:
        """See :meth:`Registry.resolve`."""
        r = parse_ref(ref)
        model = self.models.get(r.model)
        if r.kind == "latest":
            v = self.latest(model)
            if v is None:
                raise VersionNotFoundError(
                    f"model {r.model} has no versions yet", "train into it or `finetune models import` a base"
                )
            return v
        if r.kind == "number":
            v = self.at(model, int(str(r.value)))
            if v is None:
                raise VersionNotFoundError(
                    f"version {r.model}:{r.value} not found", f"see `finetune versions list {r.model}`"
                )
            return v
        if r.kind == "alias":
            aliases = self.aliases(r.model)
            if r.value not in aliases:
                known = ", ".join(sorted(aliases)) or "none"
                raise VersionNotFoundError(f"no alias {r.value!r} on {r.model} (aliases: {known})")
            v = self.at(model, aliases[r.value])
            if v is None:
                raise VersionNotFoundError(f"alias {r.model}:{r.value} points at a deleted version")
            return v
        matches = [v for v in self.all(r.model) if v.id.startswith(str(r.value))]
        if not matches:
            raise VersionNotFoundError(f"no version of {r.model} has an id starting with {r.value}")
        if len(matches) > 1:
            listed = ", ".join(f"{v.ref} ({v.id[:16]})" for v in matches)
            raise AmbiguousRefError(f"id prefix {r.value} is ambiguous: {listed}", "give more hex characters")
        return matches[0]

    def check_destination(self, name: str) -> None:
        """See :meth:`Registry.check_destination`."""
        m = self.models.get(name)
        self.next_number(m.path)
        latest = self.latest(m)
        try:
            kind = latest.kind if latest is not None else None
        except IntegrityError:
            kind = None  # a damaged newest version says nothing about the model; listing shows it
        if kind == "base" and latest is not None:
            raise ConflictError(f"{name} holds base model {latest.ref}: a training would make an adapter its latest",
                                f"train into a model of its own, e.g. --destination {name}-ft --create-destination")

    # ---------------------------------------------------------------- aliases
    def aliases(self, name: str) -> dict[str, int]:
        return read_aliases(self.layout.aliases_file(self.models.get(name).path))

    def set_alias(self, version: Version, alias: str) -> Version:
        """See :meth:`Registry.set_alias` (``version`` as resolved from its ref)."""
        m = self.models.get(version.model)
        ensure_writable(self.layout)
        with model_lock(self.layout, m.path):
            # delete_version checks aliases under this lock, so check here, under it too, that the version was not
            # deleted since resolve(): otherwise the alias could end up pointing at nothing.
            if not version.path.is_dir():
                raise VersionNotFoundError(f"version {version.ref} not found (deleted just now)")
            aliases = self.aliases(version.model)
            aliases[alias] = version.number
            atomic.replace_file(self.layout.aliases_file(m.path), atomic.pretty_json(aliases), self.layout.staging)
        return version

    def remove_alias(self, name: str, alias: str, number: int | None = None) -> None:
        """See :meth:`Registry.remove_alias`."""
        m = self.models.get(name)
        ensure_writable(self.layout)
        with model_lock(self.layout, m.path):
            aliases = self.aliases(name)
            if alias not in aliases:
                raise NotFoundError(f"no alias {alias!r} on {name}")
            if number is not None and aliases[alias] != number:
                raise ConflictError(f"alias {alias!r} points at {name}:{aliases[alias]}, not {name}:{number}",
                                    f"to remove it anyway, name the model alone: `finetune versions alias {name} "
                                    f"{alias} --remove`")
            del aliases[alias]
            atomic.replace_file(self.layout.aliases_file(m.path), atomic.pretty_json(aliases), self.layout.staging)


def _load_manifest(key: str, manifest: str) -> str | None:
    try:
        return json.dumps(read_manifest(Path(manifest).parent))
    except (IntegrityError, OSError):
        return None  # damaged: the Version reads it itself, for the error
