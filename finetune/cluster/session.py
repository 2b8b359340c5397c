"""Joining the Ray cluster, and the few facts about its nodes that the executor reads.

The server is one Ray driver. Its actors live in a Ray namespace of their own per registry
(:func:`namespace_for`), so two servers on two registries can share a cluster without seeing each other's
trainings, and a restarted server finds its own by name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError, one_line
from .options import require_ray

HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node has it
_joined: str | None = None  # how this process joined (connect says it once, the executor again)


def namespace_for(root: str | os.PathLike[str]) -> str:
    """The Ray namespace of one registry's actors."""
    return "finetune-" + hashlib.sha256(str(Path(root).absolute()).encode()).hexdigest()[:12]


def short(node_id: str) -> str:
    """A node id as people read it (Ray prints the same first characters)."""
    return node_id[:8]


@dataclass(frozen=True)
class NodeInfo:
    """One node of the cluster as Ray's node table describes it."""

    node_id: str
    host: str
    address: str
    alive: bool
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def is_head(self) -> bool:
        return HEAD_RESOURCE in self.resources

    def describe(self) -> str:
        """``node 1891f0c7 (gpu-3, 10.0.0.7)``."""
        where = self.host if self.host == self.address else f"{self.host}, {self.address}"
        return f"node {short(self.node_id)} ({where})"


def nodes() -> list[NodeInfo]:
    """Every node Ray knows (alive or dead), from its node table."""
    import ray

    out = []
    for entry in ray.nodes():
        out.append(NodeInfo(node_id=entry["NodeID"], host=entry.get("NodeManagerHostname") or "?",
                            address=entry.get("NodeManagerAddress") or "?", alive=bool(entry.get("Alive")),
                            resources=dict(entry.get("Resources") or {})))
    return out


def describe_node(node_id: str, known: dict[str, Any] | None = None) -> str:
    """A node by id, with its host when Ray (or ``known``: a placement entry) still knows it."""
    for node in nodes():
        if node.node_id == node_id:
            return node.describe()
    host = (known or {}).get("host")
    return f"node {short(node_id)}" + (f" ({host})" if host else "")


def connect(address: str | None, root: str | os.PathLike[str]) -> str:
    """Join the cluster at ``address`` (None: ``RAY_ADDRESS``, else start a Ray for this server alone) in the
    registry's namespace. Returns how it was joined, for the server's first lines; errors are one line."""
    global _joined
    require_ray()
    import ray

    if ray.is_initialized():
        return _joined or f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Trainings write their own logs into the registry: the workers' output stays in Ray's session logs instead of
    # being copied, interleaved, into the server's terminal.
    kwargs: dict[str, Any] = {"namespace": namespace_for(root), "log_to_driver": False,
                              "logging_level": logging.WARNING}
    if address is None:
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UsageError(f"cannot join the Ray cluster at {address}: {one_line(err)}",
                         "start it with `ray start --head`, or check --ray-address / RAY_ADDRESS") from None
    _joined = f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    return _joined

