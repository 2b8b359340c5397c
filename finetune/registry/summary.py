"""Facts about models, versions and trainings as the CLI shows them (and, later, the API and the web app).

One function per fact, so that every front end says the same thing the same way. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from .manifest import Version
from .store import Model, Registry


def metrics_summary(version: Version) -> str:
    metrics = version.metadata.get("metrics", {})
    parts = []
    for key in ("train_loss", "eval_loss"):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{key}={metrics[key]:.4f}")
    return " ".join(parts)


def parent_summary(version: Version) -> str:
    parent = version.parent
    if not isinstance(parent, dict):
        return "-"
    if "ref" in parent:
        return parent["ref"]
    if "hub_id" in parent:
        return f"hub:{parent['hub_id']}@{str(parent.get('revision'))[:10]}"
    if "local_path" in parent:
        return f"local:{parent['local_path']}"
    return "-"


def model_summary(reg: Registry, m: Model) -> dict[str, Any]:
    versions = reg.list_versions(m.full_name)  # newest first: the latest is its head
    return {**m.to_dict(), "model": m.full_name, "versions": len(versions),
            "latest": versions[0].ref if versions else None}

