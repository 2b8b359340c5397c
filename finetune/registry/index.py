"""Finding a version by its 64-hex id without reading every manifest on every request.

The registry stores versions by number; an id is only in the manifest. :class:`VersionIndex` remembers, per
model, which numbers it has read and the id of each, so a lookup reads only manifests of versions published
since the last miss. A remembered entry goes stale when its version is deleted, or when its model is deleted and
created again (numbers then restart): a lookup checks that the version still exists and still has that id
(one ``stat`` and a manifest read), and a model is known by its name and ``created_at``. Thread-safe.
"""

from __future__ import annotations

import threading

from ..errors import IntegrityError, ModelNotFoundError
from .manifest import Version
from .store import Registry


class VersionIndex:
    """Memory of ``id -> (model, number)`` over one registry, filled lazily."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self._ids: dict[str, tuple[str, int]] = {}
        self._seen: dict[tuple[str, str], set[int]] = {}  # (model, created_at) -> numbers read
        self._lock = threading.Lock()

    def find(self, version_id: str, model: str | None = None) -> Version | None:
        """The version with this exact id (in ``model`` when given), or ``None``."""
        hit = self._lookup(version_id, model)
        if hit is not None:
            return hit
        models = [model] if model is not None else [m.full_name for m in self.registry.list_models()]
        for name in models:
            self._scan(name)
        return self._lookup(version_id, model)

    def _lookup(self, version_id: str, model: str | None) -> Version | None:
        entry = self._ids.get(version_id)
        if entry is None or (model is not None and entry[0] != model):
            return None
        name, number = entry
        try:
            version = self.registry.version(name, number)
            if version is not None and version.id != version_id:
                version = None  # the model was created again and the number now names another version
        except (ModelNotFoundError, IntegrityError):
            version = None
        if version is None:
            with self._lock:
                self._ids.pop(version_id, None)
        return version

    def _scan(self, model: str) -> None:
        try:
            created_at = self.registry.get_model(model).created_at
            versions = self.registry.list_versions(model)
        except ModelNotFoundError:
            return
        with self._lock:
            seen = self._seen.setdefault((model, created_at), set())
            new = [v for v in versions if v.number not in seen]
        found = {}
        for v in new:
            try:
                found[v.id] = (model, v.number)
            except (IntegrityError, FileNotFoundError):
                continue  # damaged or deleted meanwhile: not findable by id
        with self._lock:
            self._ids.update(found)
            seen.update(n for _, n in found.values())
