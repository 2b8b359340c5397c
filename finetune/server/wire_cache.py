"""Version objects serialized once: a version never changes, so its JSON is built from its manifest once.

Listing 50 versions then costs 50 dictionary look-ups instead of 50 manifest reads and encodings. The key
carries the model's ``created_at``: numbers restart only when a model is deleted and created again, which gives
it a new ``created_at``. A deleted version is never served from here, because callers look up only numbers
that the registry lists (or resolves) at the time of the request. Bounded; thread-safe.
"""

from __future__ import annotations

import json
import threading

from ..errors import IntegrityError
from ..registry import Model, Registry
from .objects import version_object

MAX_ENTRIES = 20_000  # about 2 KB each


class VersionJSON:
    """``version -> bytes`` of :func:`~finetune.server.objects.version_object`, remembered."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._cache: dict[tuple[str, str, int], bytes] = {}
        self._lock = threading.Lock()

    def get(self, registry: Registry, model: Model, number: int) -> bytes | None:
        """Version ``number`` of ``model`` as JSON; ``None`` if it is gone or its manifest is damaged."""
        key = (model.full_name, model.created_at, number)
        data = self._cache.get(key)
        if data is None:
            version = registry.version(model.full_name, number)
            try:
                data = json.dumps(version_object(version), separators=(",", ":")).encode() if version else None
            except (IntegrityError, FileNotFoundError):
                data = None  # damaged, or deleted while we read it: left out of listings
            if data is None:
                return None
            with self._lock:
                if len(self._cache) >= self.max_entries:
                    self._cache.clear()  # simple and rare: refilled from manifests on demand
                self._cache[key] = data
        return data
