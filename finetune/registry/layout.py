"""Where everything lives inside a registry root: the one module that builds paths under it.

Every other module asks :class:`Layout` (``Registry.layout``) for the folder or file it needs; none joins
names onto the root itself, so the drawing below is the whole truth::

    ROOT/
      models/OWNER/NAME/
        model.json             description, visibility, hardware, created_at, readme and links
        next_version           the next number to hand out (numbers are never reused)
        aliases.json           {"prod": 3, ...}
        .lock                  allocation lock (filelock)
        versions/N/            one published version: its files + manifest.json, all read-only
        retired/N              the tombstone of deleted version N (registry.deletion)
      trainings/ID/            one training run (registry.jobs.Trainings); ID = YYYYMMDD-HHMMSS-xxxxxx
        record.json            id, status, model, destination, input, output, metrics, error, timestamps, pid
        train.log              what the run printed
        metrics.jsonl          one JSON object per logged step
        checkpoints/step-N/    what --resume needs (training.checkpoint)
        output/                the adapter folder that gets published
        trackers/              what experiment trackers wrote (tensorboard/ event files, wandb/ offline runs)
        cancel                 present when `finetune trainings cancel` asked the run to stop
      predictions/ID/          prediction records, same store (registry.jobs.RecordStore)
      accounts/                the service's accounts and token hashes (registry.accounts)
        OWNER.json, tokens/HASH.json, .tmp/
      files/ID/                files uploaded to the service (registry.files)
      archive/ID/              a version its owner deleted that other owners' versions derive from (registry.deletion)
      cache/KIND/...           derived data that can be rebuilt (tokenized datasets, verified hashes)
      cache/index/index.sqlite the index of models, versions and records (registry.catalog; never the truth)
      trackers/                experiment trackers' stores shared by all trainings (mlflow.db, MLflow's local store)
      .staging/                publishes and temp files in progress; `gc` removes abandoned ones
      .trash/                  deletions in progress
      server.lock, server.json the lock the one server of this registry holds, and who it is (server.instance)

A version folder appears whole or not at all (publishing stages and commits it: :mod:`finetune.registry.publish`);
``.staging`` and ``.trash`` entries are named after their process so `gc` can tell abandoned ones
(:mod:`finetune.registry.gc`). Job records (``record.json``) are replaced atomically on every change, so a reader
never sees half a record.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..names import check_name

RECORD = "record.json"  # a job record's file in its folder
CHECKPOINT_STATE = "state.json"  # a training checkpoint's last file: its presence means the checkpoint is complete
JOB_KINDS = ("trainings", "predictions")  # the folders of job records under the root


@dataclass(frozen=True)
class TrainingPaths:
    """Where one training run keeps its files (see the layout above); handed out by :meth:`Layout.training_paths`."""

    folder: Path
    record: Path
    log: Path
    metrics: Path
    checkpoints: Path
    output: Path
    cancel: Path  # the marker `finetune trainings cancel` leaves

    @property
    def trackers(self) -> Path:
        """Where experiment trackers write this run's files (training.trackers)."""
        return self.folder / "trackers"

    @classmethod
    def under(cls, folder: Path) -> TrainingPaths:
        return cls(folder, folder / RECORD, folder / "train.log", folder / "metrics.jsonl",
                   folder / "checkpoints", folder / "output", folder / "cancel")


def completed_checkpoints(root: Path) -> list[Path]:
    """A training's checkpoints that were completed (``state.json`` written last), newest first
    (:mod:`finetune.training.checkpoint` writes them; the registry needs to know which runs can still resume)."""
    return [p for p in sorted(root.glob("step-*"), reverse=True) if (p / CHECKPOINT_STATE).is_file()]


class Layout:
    """The paths of one registry root. Pure: builds paths, touches nothing on disk."""

    def __init__(self, root: Path):
        self.root = root

    # ---------------------------------------------------------------- models and versions
    @property
    def models(self) -> Path:
        return self.root / "models"

    def model_dir(self, owner: str, name: str) -> Path:
        return self.models / check_name(owner, "owner") / check_name(name, "model name")

    def model_file(self, model_dir: Path) -> Path:
        return model_dir / "model.json"

    def counter(self, model_dir: Path) -> Path:
        return model_dir / "next_version"

    def aliases_file(self, model_dir: Path) -> Path:
        return model_dir / "aliases.json"

    def lock_file(self, model_dir: Path) -> Path:
        return model_dir / ".lock"

    def versions_dir(self, model_dir: Path) -> Path:
        return model_dir / "versions"

    def version_dir(self, model_dir: Path, number: int) -> Path:
        return self.versions_dir(model_dir) / str(number)

    def version_dirs(self, model_dir: Path, numbers: list[int]) -> dict[int, str]:
        """``{number: its folder}`` for many versions at once, as plain strings (see :meth:`record_files`)."""
        folder = os.fspath(self.versions_dir(model_dir))
        return {n: os.path.join(folder, str(n)) for n in numbers}

    def retired_dir(self, model_dir: Path) -> Path:
        return model_dir / "retired"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    def archived(self, version_id: str) -> Path:
        """Where a deleted version other owners' versions derive from is kept, by its id (registry.deletion)."""
        return self.archive / version_id

    # ---------------------------------------------------------------- work in progress
    @property
    def staging(self) -> Path:
        return self.root / ".staging"

    @property
    def trash(self) -> Path:
        return self.root / ".trash"

    # ---------------------------------------------------------------- job records
    def jobs_dir(self, kind: str) -> Path:
        """The folder that holds one sub-folder per record of a kind of job (``trainings``, ``predictions``)."""
        if kind not in JOB_KINDS:
            raise UsageError(f"unknown kind of job {kind!r}", f"use one of: {', '.join(JOB_KINDS)}")
        return self.root / kind

    def job_dir(self, kind: str, job_id: str) -> Path:
        return self.jobs_dir(kind) / check_name(job_id, f"{kind.removesuffix('s')} id")

    def record_file_of(self, kind: str) -> Callable[[str], str]:
        """``record_file(id)``, the ``record.json`` of a record of ``kind``, as a plain string: for listings of
        100,000 records, where :class:`~pathlib.Path` objects would cost more than the rest. The ids come from
        listing the folder (they are its entries)."""
        prefix = os.path.join(os.fspath(self.jobs_dir(kind)), "")
        suffix = os.sep + RECORD
        return lambda job_id: prefix + job_id + suffix

    def training_paths(self, training_id: str) -> TrainingPaths:
        return TrainingPaths.under(self.job_dir("trainings", training_id))

    # ---------------------------------------------------------------- the service's files
    @property
    def accounts(self) -> Path:
        return self.root / "accounts"

    def account_file(self, owner: str) -> Path:
        return self.accounts / f"{check_name(owner, 'owner')}.json"

    @property
    def tokens(self) -> Path:
        return self.accounts / "tokens"

    def token_file(self, digest: str) -> Path:
        return self.tokens / f"{digest}.json"

    @property
    def accounts_tmp(self) -> Path:
        """Temp files of account writes: on the accounts' filesystem, readable by the registry's owner only."""
        return self.accounts / ".tmp"

    @property
    def files(self) -> Path:
        return self.root / "files"

    def upload_dir(self, file_id: str) -> Path:
        return self.files / file_id

    def server_files(self) -> tuple[Path, Path]:
        """The lock that the registry's one server holds while it runs, and the file naming that server."""
        return self.root / "server.lock", self.root / "server.json"

    # ---------------------------------------------------------------- derived data
    @property
    def trackers(self) -> Path:
        return self.root / "trackers"

    def cache_dir(self, kind: str) -> Path:
        return self.root / "cache" / check_name(kind, "cache kind")

    @property
    def index_file(self) -> Path:
        """The SQLite index (:mod:`finetune.registry.catalog`): derived, rebuilt from the folders when needed."""
        return self.cache_dir("index") / "index.sqlite"
