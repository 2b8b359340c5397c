"""Storage: the registry of destination models, their immutable versions, and the records of jobs (trainings).

Nothing here imports torch. See :mod:`finetune.registry.store` for the on-disk layout.
"""

from .manifest import FORMAT_VERSION, MANIFEST, Version, check_version_dir, manifest_id, read_manifest
from .store import HARDWARE, VISIBILITIES, Model, Registry, process_alive

__all__ = ["FORMAT_VERSION", "HARDWARE", "MANIFEST", "VISIBILITIES", "Model", "Registry", "Version",
           "check_version_dir", "manifest_id", "process_alive", "read_manifest"]
