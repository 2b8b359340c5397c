"""How a server was started: the options of ``finetune serve``, as one value every route can read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..cluster.options import ClusterOptions, PredictOptions
from ..serving.schema import DEFAULT_MAX_PROMPT_BYTES
from ..serving.service import DEFAULT_MAX_PER_ACCOUNT

DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
# Trainings: what one account may have queued or running at once, the most steps a training may ask for, and
# how long one run may take before it is stopped (failed). None: no limit.
DEFAULT_MAX_TRAININGS_PER_ACCOUNT = 10
DEFAULT_MAX_TRAINING_STEPS = 100_000
DEFAULT_MAX_TRAINING_TIME_S = 24 * 3600.0


@dataclass(frozen=True)
class ServerSettings:
    """Options of one server. Routes read them as ``request.app.state.settings`` (see :mod:`.context`).

    ``workers`` is the number of training worker processes (``None``: one per GPU, one on a CPU-only machine).
    ``allowed_data_dirs`` are the server folders a training input may name as data; empty means none may be
    named (remote users upload files instead). ``public_base_url`` is how clients reach the server
    (``https://ft.example.org``) when it sits behind a proxy; by default links name the address the server is
    bound to (never the request's ``Host`` header, which the client chooses). ``allow_webhook_hosts`` are the
    hosts, addresses or networks (``127.0.0.1``, ``10.0.0.0/8``, ``hooks.internal``) webhooks may reach although
    they are not public (see :mod:`.webhook_targets`).
    The ``max_training*`` limits keep one account from holding the training workers (None: no limit).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    allowed_data_dirs: tuple[Path, ...] = field(default_factory=tuple)
    public_base_url: str | None = None
    allow_webhook_hosts: tuple[str, ...] = ()
    api_docs: bool = False  # serve /v1/openapi.json and a local /v1/docs page (finetune serve --api-docs)
    page_size: int = 50
    max_trainings_per_account: int | None = DEFAULT_MAX_TRAININGS_PER_ACCOUNT  # queued + running, per account
    max_training_steps: int | None = DEFAULT_MAX_TRAINING_STEPS  # the largest train.max_steps accepted
    max_training_time_s: float | None = DEFAULT_MAX_TRAINING_TIME_S  # a run past it is stopped and fails
    # each single-device training slot keeps a worker process started ahead of need (its imports done), so a
    # training starts loading at once; off, a worker starts with its training (seconds later, no idle process)
    train_prestart: bool = True
    # predictions (finetune.serving): inference worker processes, each one's cache budget for model weights
    # (None: no limit), the device they run on, and whether they start with the server or at the first call
    predict_workers: int = 1
    predict_memory_mb: float | None = None
    predict_device: str = "auto"
    predict_max_batch: int = 32
    predict_prestart: bool = False
    # the limits on predictions (README, "Predictions"): a prompt's UTF-8 bytes and tokens (None: the model's
    # context), and each account's predictions starting or running at once
    predict_max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    predict_max_prompt_tokens: int | None = None
    predict_max_per_account: int | None = DEFAULT_MAX_PER_ACCOUNT  # None: no limit
    predict_threads: int | None = None  # torch CPU threads of each inference worker (None: torch's default)
    # trainings on a Ray cluster (`--executor ray`); None: in worker processes on this machine
    cluster: ClusterOptions | None = None
    # inference workers as Ray actors (`--predict-executor ray`); None: worker processes on this machine
    predict_cluster: PredictOptions | None = None
