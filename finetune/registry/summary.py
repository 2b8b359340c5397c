"""Facts about models, versions and trainings as the CLI shows them (and, later, the API and the web app).

One function per fact, so that every front end says the same thing the same way. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Any, cast

from ..errors import IntegrityError
from .manifest import Version
from .store import Model, Registry


def damage(version: Version) -> str | None:
    """Why a version's manifest cannot be read (it is listed, marked, instead of hiding the others), else None."""
    try:
        version.manifest
    except IntegrityError as err:
        return err.message
    return None


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
        return cast(str, parent["ref"])
    if "hub_id" in parent:
        return f"hub:{parent['hub_id']}@{str(parent.get('revision'))[:10]}"
    if "local_path" in parent:
        return f"local:{parent['local_path']}"
    return "-"


def model_summary(reg: Registry, m: Model) -> dict[str, Any]:
    versions = reg.list_versions(m.full_name)  # newest first: the latest is its head
    return {**m.to_dict(), "model": m.full_name, "versions": len(versions),
            "latest": versions[0].ref if versions else None}



def training_progress(record: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a training stands, from its record and its ``metrics.jsonl`` rows: the last step, the total when
    known (``train.max_steps``, or epochs times the steps per epoch that the rows imply), tokens/s, and the time
    left (None when it cannot be told yet).

    The time left comes from the steps measured after the first logged one: the first step also pays for
    loading and warming up, and runs the largest batch, so a pace that counts it overstates what is left."""
    timed = [r for r in rows if isinstance(r.get("step"), int) and isinstance(r.get("time_s"), (int, float))]
    last = next((r for r in reversed(rows) if isinstance(r.get("step"), int)), None)
    step = last["step"] if last else 0
    train_cfg = ((record.input or {}).get("train") or {}) if hasattr(record, "input") else {}
    total = train_cfg.get("max_steps")
    if not total and last and isinstance(last.get("epoch"), (int, float)) and last["epoch"] > 0:
        epochs = train_cfg.get("epochs") or 1.0
        total = math.ceil(epochs * round(step / last["epoch"]))
    eta = None
    if total and timed and step < total:
        first, end = timed[0], timed[-1]
        steps, seconds = end["step"] - first["step"], end["time_s"] - first["time_s"]
        if steps > 0 and seconds > 0:
            eta = seconds / steps * (total - end["step"])
    return {"step": step, "total_steps": total or None, "tokens_per_s": last.get("tokens_per_s") if last else None,
            "eta_s": eta}
