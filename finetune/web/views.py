"""What the pages show about models, versions and trainings: plain dicts for the templates, built from the
registry's objects and the same fact functions the CLI and the API use (``registry.summary``)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ..registry import Registry, Version
from ..registry.jobs import FINAL, TrainingRecord
from ..registry.summary import parent_summary, training_progress


def when(stamp: str | None) -> str:
    """``2026-12-01T10:49:38.123456Z`` -> ``2026-12-01 10:49:38 UTC``."""
    return f"{stamp[:19].replace('T', ' ')} UTC" if stamp else "–"


def when_short(stamp: str | None) -> str:
    """``2026-12-01 10:49`` (UTC), for tables."""
    return stamp[:16].replace("T", " ") if stamp else "–"


def number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    value = int(round(value))
    if value < 60:
        return f"{value} s"
    if value < 3600:
        return f"{value // 60} min {value % 60:02d} s"
    return f"{value // 3600} h {value % 3600 // 60:02d} min"


def size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def version_row(v: Version) -> dict[str, Any]:
    """One row of the Versions tab."""
    meta = v.metadata
    metrics = meta.get("metrics") or {}
    data = meta.get("dataset") or {}
    return {
        "number": v.number, "id": v.id, "ref": v.ref, "kind": v.kind, "created": when_short(v.created_at),
        "created_full": when(v.created_at),
        "parent": parent_summary(v),
        "data": {"rows": data.get("rows"), "sha": str(data.get("sha256") or "")[:8]} if data else None,
        "train_loss": number(metrics.get("train_loss")), "eval_loss": number(metrics.get("eval_loss")),
        "tokens_per_s": number(metrics.get("tokens_per_s"), 0) if metrics.get("tokens_per_s") else "–",
    }


def _parse(stamp: str | None) -> _dt.datetime | None:
    if not stamp:
        return None
    try:
        return _dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return None


def duration_s(record: TrainingRecord) -> float | None:
    """Seconds from start to end (or to now, while it runs)."""
    start = _parse(record.started_at) or _parse(record.created_at)
    if start is None:
        return None
    end = _parse(record.completed_at) if record.completed_at else None
    if end is None and record.status in FINAL:
        return None
    return ((end or _dt.datetime.now(_dt.timezone.utc)) - start).total_seconds()


def version_number(ref: str | None) -> int | None:
    if not ref or ":" not in ref:
        return None
    tail = ref.rsplit(":", 1)[1]
    return int(tail) if tail.isdigit() else None


def training_view(record: TrainingRecord, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A training for its page and for the Trainings tab; ``rows`` (metrics.jsonl) add progress and ETA."""
    version = (record.output or {}).get("version")
    view = {
        "id": record.id, "status": str(record.status), "final": record.status in FINAL,
        "destination": record.destination,
        "trainer": record.model or (record.input or {}).get("base_model") or "–",
        "created": when(record.created_at), "duration": seconds(duration_s(record)),
        "error": record.error, "version": version, "version_number": version_number(version),
        "where": placement_text(record.placement),
    }
    if rows is not None:
        progress = training_progress(record, rows)
        total = progress["total_steps"]
        view["progress"] = (f"step {progress['step']} of {total}" if total else f"step {progress['step']}") \
            if progress["step"] else ("waiting for a worker" if record.status == "starting" else "–")
        view["tokens_per_s"] = number(progress["tokens_per_s"], 0) if progress["tokens_per_s"] else "–"
        view["eta"] = seconds(progress["eta_s"]) if progress["eta_s"] is not None and not view["final"] else "–"
        train_points = sum(1 for r in rows if isinstance(r.get("loss"), (int, float)))
        eval_points = sum(1 for r in rows if isinstance(r.get("eval_loss"), (int, float)))
        view["points"] = f"{train_points} training points, {eval_points} eval points"
    return view


def placement_text(placement: dict[str, Any] | None) -> str:
    """Where a cluster ran a training: ``vm-2 (node 5553a15e), attempt 2 of 3; lost vm-1 (node 090176a9): node
    lost``; ``–`` for a run on the server's own machine."""
    if not placement:
        return "–"
    nodes = placement.get("nodes") or []
    seen = list(dict.fromkeys(f"{n.get('host', '?')} (node {str(n.get('node_id', '?'))[:8]})" for n in nodes))
    text = ", ".join(seen) if seen else "being placed"
    if len(nodes) > 1:
        text = f"{len(nodes)} processes on {text}"
    attempts, most = placement.get("attempts"), placement.get("max_attempts")
    if attempts:
        text += f", attempt {attempts}" + (f" of {most}" if most else "")
    lost = [f"{e.get('host', '?')} (node {str(e.get('node_id', '?'))[:8]}): {e.get('why', 'lost')}"
            for e in placement.get("lost") or []]
    if lost:
        text += "; lost " + ", ".join(lost)
    return text


TRAINER_CHOICES = 20  # the newest versions offered per model; older ones are trained from with the API or CLI


def trainer_choices(reg: Registry, models: list, this_model: str) -> tuple[list[tuple[str, list[str]]], str | None]:
    """The Train tab's "start from" choices, grouped by model (this model first), and the default: this
    model's latest version, else the first base version offered."""
    groups: list[tuple[str, list[str]]] = []
    default = None
    ordered = sorted(models, key=lambda m: (m.full_name != this_model, m.full_name))
    first_base = None
    for m in ordered:
        versions = reg.list_versions(m.full_name)
        if not versions:
            continue
        refs = [v.ref for v in versions[:TRAINER_CHOICES]]
        groups.append((m.full_name, refs))
        if m.full_name == this_model:
            default = refs[0]
        if first_base is None:
            first_base = next((v.ref for v in versions if v.kind == "base"), None)
    return groups, default or first_base or (groups[0][1][0] if groups else None)
