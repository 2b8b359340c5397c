"""How ``finetune serve --executor ray`` was asked to use the cluster: one value, checked on the command line.

Nothing here imports Ray: the server's settings hold these options whether or not Ray is installed, and only
:func:`require_ray` (called when the Ray executor is chosen) says, in one line, what to install.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import UsageError

EXECUTORS = ("local", "ray")
_RESOURCE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.:/-]*)=([0-9]*\.?[0-9]+)$")
_RESERVED = {"CPU", "GPU", "memory", "object_store_memory"}


@dataclass(frozen=True)
class ClusterOptions:
    """The Ray executor's options (see ``finetune serve --help``).

    ``address``: the cluster to join (None: ``RAY_ADDRESS``, else a Ray started for this server alone).
    ``gpus_per_training``: processes of a GPU training, one GPU each, unless its config sets ``train.processes``.
    ``cpus_per_process``: CPUs each training process asks for (its torch threads follow it).
    ``max_retries``: how many times a training is started again after it lost its node (or its process died).
    ``resources``: custom Ray resources each training process asks for, to keep trainings on some nodes.
    ``warm_actors``: idle actors kept started with the training code imported, so a training starts at once.
    """

    address: str | None = None
    gpus_per_training: int = 1
    cpus_per_process: float = 1.0
    max_retries: int = 2
    resources: dict[str, float] = field(default_factory=dict)
    warm_actors: int = 1

    def __post_init__(self) -> None:
        if self.gpus_per_training < 1:
            raise UsageError(f"--gpus-per-training must be 1 or more, not {self.gpus_per_training}")
        if not (self.cpus_per_process > 0 and math.isfinite(self.cpus_per_process)):
            raise UsageError(f"--cpus-per-process must be more than 0, not {self.cpus_per_process:g}")
        if self.max_retries < 0:
            raise UsageError(f"--max-retries must be 0 or more, not {self.max_retries}")
        if self.warm_actors < 0:
            raise UsageError(f"--warm-actors must be 0 or more, not {self.warm_actors}")


@dataclass(frozen=True)
class PredictOptions:
    """Inference workers as Ray actors (``finetune serve --predict-executor ray``).

    ``address``: the cluster to join (the same as the trainings' when both run on Ray).
    ``cpus``: CPUs each inference actor asks for (0: it may share a node's CPUs with anything).
    ``gpus``: GPUs each asks for (None: one when ``--predict-device`` names a GPU, or it is ``auto`` and the
    cluster has GPUs).
    ``resources``: custom Ray resources each asks for, to keep inference on some nodes.
    """

    address: str | None = None
    cpus: float = 1.0
    gpus: float | None = None
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.cpus >= 0 and math.isfinite(self.cpus)):
            raise UsageError(f"--predict-cpus must be 0 or more, not {self.cpus:g}")


def parse_resource(text: str, flag: str = "--ray-resource") -> tuple[str, float]:
    """``NAME=AMOUNT`` (``--ray-resource trainer=1``) as a pair; CPUs and GPUs have their own options."""
    match = _RESOURCE.match(text.strip())
    if not match:
        raise UsageError(f"{flag} {text!r}: expected NAME=AMOUNT, e.g. trainer=1")
    name, amount = match.group(1), float(match.group(2))
    if name in _RESERVED:
        hint = "use --predict-cpus" if flag.startswith("--predict") else "use --cpus-per-process or --gpus-per-training"
        raise UsageError(f"{flag} {text!r}: {name} has its own option", hint)
    if amount <= 0:
        raise UsageError(f"{flag} {text!r}: the amount must be more than 0")
    return name, amount


def require_ray(flag: str = "--executor ray") -> None:
    """Raise a one-line :class:`UsageError` saying what to install when Ray is missing."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UsageError(f"{flag} needs Ray, which is not installed",
                         "pip install 'finetune[ray]' (on the server and on every node of the cluster)") from None
