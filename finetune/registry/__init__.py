"""Storage: the registry of destination models, their immutable versions, and the records of jobs (trainings).

Nothing here imports torch. The on-disk layout is drawn once, in :mod:`finetune.registry.layout`; :class:`Registry`
(:mod:`finetune.registry.store`) is the public face of models and versions.
"""

from ..processes import process_alive
from .manifest import FORMAT_VERSION, MANIFEST, Version, check_version_dir, manifest_id, read_manifest
from .store import HARDWARE, VISIBILITIES, Model, Registry, TrainingPaths

__all__ = ["FORMAT_VERSION", "HARDWARE", "MANIFEST", "VISIBILITIES", "Model", "Registry", "TrainingPaths", "Version",
           "check_version_dir", "manifest_id", "process_alive", "read_manifest"]
