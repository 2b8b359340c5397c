"""Which nodes may run trainings (and inference actors): every node must see the server's registry, at the same
path, writable.

A training on a node that cannot see the registry would fail late (or, worse, write into a folder nobody else
reads), so the server probes each node when it starts and when a node joins: a tiny task pinned to the node
reads a file the server wrote under the registry root and writes one back, which the server then reads. A node
that fails is refused by name (the server's log says which node, which path and why) and kept out of placement
through Ray's label selectors (``ray.io/node-id``); a node that did not answer is probed again later.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import atomic
from ..errors import one_line
from ..registry import Registry
from .session import NodeInfo, nodes

PROBE_TIMEOUT_S = 60.0  # a new node starts a Ray worker and imports finetune first
RETRY_UNANSWERED_S = 30.0
_TOKEN = "token"


def probe_registry(root: str, folder: str, token: str, node_id: str) -> str | None:
    """Run ON a node: the problem that keeps this node from using the registry at ``root``, or None.

    ``folder`` (under ``root``) holds the server's ``token``; the node reads it and writes its own reply there."""
    if not os.path.isdir(root):
        return f"the registry {root} does not exist there (mount the shared registry at that same path)"
    try:
        seen = (Path(folder) / _TOKEN).read_text()
    except FileNotFoundError:
        seen = None
    except OSError as err:
        return f"cannot read the registry {root} there: {err.strerror or err}"
    if seen != token:
        return (f"{root} there is another folder, not the server's registry (mount the shared registry at that "
                f"same path)")
    try:
        atomic.replace_file(Path(folder) / f"reply-{node_id}", f"{token} {node_id}".encode(), Path(folder))
    except OSError as err:
        return f"cannot write to the registry {root} there: {err.strerror or err} (trainings write their records, " \
               f"checkpoints and versions there)"
    return None


@dataclass
class Verdict:
    node: NodeInfo
    problem: str | None  # None: usable
    what: str = "training"  # what the gate keeps off refused nodes

    def describe(self) -> str:
        if self.problem is None:
            return f"{self.node.describe()}: usable"
        return f"{self.node.describe()} refused: {self.problem}; no {self.what} runs there"


class NodeGate:
    """The verdict on every alive node, kept current by :meth:`refresh` (probes are non-blocking)."""

    def __init__(self, registry: Registry, say: Callable[[str], None], what: str = "training"):
        import ray

        self.registry = registry
        self.say = say
        self.what = what
        self.verdicts: dict[str, Verdict] = {}
        self._pending: dict[str, tuple[NodeInfo, object, float]] = {}  # node id -> (node, probe ref, started)
        self._unanswered: dict[str, float] = {}  # node id -> when to probe again
        self._alive: set[str] = set()
        self._folder = registry.staging_dir("node-probe")
        self._token = secrets.token_hex(16)
        atomic.write_bytes_durable(self._folder / _TOKEN, self._token.encode())
        self._probe = ray.remote(probe_registry)

    # ---------------------------------------------------------------- views
    def refused(self) -> list[str]:
        """Ids of alive nodes that failed the probe, or have not passed it yet (trainings stay off them)."""
        return sorted(n for n in self._alive if n not in self.usable_ids())

    def usable_ids(self) -> set[str]:
        return {n for n, v in self.verdicts.items() if v.problem is None}

    def usable(self) -> list[NodeInfo]:
        return [v.node for v in self.verdicts.values() if v.problem is None]

    # ---------------------------------------------------------------- probing
    def refresh(self, wait_s: float = 0.0) -> bool:
        """Probe nodes that joined, collect answers (waiting up to ``wait_s`` for them), forget dead nodes.
        Returns whether any verdict changed."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        table = [n for n in nodes() if n.alive]
        self._alive = {n.node_id for n in table}
        changed = False
        for gone in [n for n in self.verdicts if n not in self._alive]:
            del self.verdicts[gone]
            changed = True
        for gone in [n for n in self._pending if n not in self._alive]:
            del self._pending[gone]
        now = time.monotonic()
        for node in table:
            known = node.node_id in self.verdicts or node.node_id in self._pending
            if known or self._unanswered.get(node.node_id, 0) > now:
                continue
            strategy = NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)
            ref = self._probe.options(num_cpus=0, max_retries=0, scheduling_strategy=strategy).remote(
                str(self.registry.root), str(self._folder), self._token, node.node_id)
            self._pending[node.node_id] = (node, ref, now)
        deadline = time.monotonic() + wait_s
        while self._pending:
            changed |= self._collect()
            if not self._pending or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return changed

    def _collect(self) -> bool:
        import ray

        changed = False
        refs = {ref: node_id for node_id, (_, ref, _) in self._pending.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            node_id = refs[ref]
            node = self._pending.pop(node_id)[0]
            try:
                problem = ray.get(ref)
            except Exception as err:  # the task could not run there: finetune missing, a broken install
                problem = _failed_probe(err)
            if problem is None:
                problem = self._check_reply(node)
            self._record(Verdict(node, problem, self.what))
            changed = True
        now = time.monotonic()
        for node_id, (node, ref, started) in list(self._pending.items()):
            if now - started > PROBE_TIMEOUT_S:
                ray.cancel(ref, force=True)
                del self._pending[node_id]
                self._unanswered[node_id] = now + RETRY_UNANSWERED_S
                self.say(f"{node.describe()} did not answer the registry probe within {PROBE_TIMEOUT_S:.0f} s; "
                         f"no {self.what} runs there until it does")
        return changed

    def _check_reply(self, node: NodeInfo) -> str | None:
        reply = self._folder / f"reply-{node.node_id}"
        try:
            ok = reply.read_text() == f"{self._token} {node.node_id}"
        except OSError:
            ok = False
        if not ok:
            return (f"it wrote under {self.registry.root}, but the server does not see what it wrote: not the same "
                    f"filesystem (mount the shared registry at that same path)")
        return None

    def _record(self, verdict: Verdict) -> None:
        self.verdicts[verdict.node.node_id] = verdict
        self._unanswered.pop(verdict.node.node_id, None)
        self.say(verdict.describe())

    def close(self) -> None:
        atomic.remove_tree(self._folder)


def _failed_probe(err: BaseException) -> str:
    text = one_line(err)
    if "ModuleNotFoundError" in text and "finetune" in text:
        return "finetune is not installed there (pip install 'finetune[ray]' on every node)"
    return f"the registry probe failed there: {text}"
