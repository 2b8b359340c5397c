"""How a server was started: the options of ``finetune serve``, as one value every route can read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..cluster.options import ClusterOptions

DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Options of one server. Routes read them as ``request.app.state.settings`` (see :mod:`.context`).

    ``workers`` is the number of training worker processes (``None``: one per GPU, one on a CPU-only machine).
    ``allowed_data_dirs`` are the server folders a training input may name as data; empty means none may be
    named (remote users upload files instead). ``public_base_url`` is how clients reach the server
    (``https://ft.example.org``) when it sits behind a proxy; by default URLs are built from each request.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    allowed_data_dirs: tuple[Path, ...] = field(default_factory=tuple)
    public_base_url: str | None = None
    page_size: int = 50
    # predictions (finetune.serving): inference worker processes, each one's cache budget for model weights
    # (None: no limit), the device they run on, and whether they start with the server or at the first call
    predict_workers: int = 1
    predict_memory_mb: float | None = None
    predict_device: str = "auto"
    predict_max_batch: int = 32
    predict_prestart: bool = False
    # trainings on a Ray cluster (`--executor ray`); None: in worker processes on this machine
    cluster: ClusterOptions | None = None
