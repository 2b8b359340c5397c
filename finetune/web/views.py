"""What the pages show about models, versions and trainings: plain dicts for the templates, built from the
registry's objects and the same fact functions the CLI and the API use (``registry.summary``)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from ..registry import Version
from ..registry.jobs import FINAL, TrainingRecord
from ..registry.summary import parent_summary, training_progress
from ..server.objects import public_lineage


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


def parent_label(v: Version) -> str:
    """A version's parent as pages show it: a registry ref, a hub id at its revision, or for a base imported
    from a folder of the server the folder's name and content hash, never its path (pages of public models are
    read by every account)."""
    parent = public_lineage(v.parent)
    if isinstance(parent, dict) and "local_folder" in parent:
        sha = f", sha256 {str(parent['sha256'])[:12]}" if parent.get("sha256") else ""
        return f"local folder {parent['local_folder']}{sha}"
    return parent_summary(v)


def source_label(text: str) -> str:
    """A training's start point as pages show it: a registry ref or hub id as it is; a folder of the server (a
    CLI training from a local model) by its name only."""
    if text.startswith(("/", "./", "../", "~", "local:")) or "\\" in text or text[1:3] == ":/":
        name = text.removeprefix("local:").replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return f"local folder {name}"
    return text


def version_row(v: Version) -> dict[str, Any]:
    """One row of the Versions tab."""
    meta = v.metadata
    metrics = meta.get("metrics") or {}
    data = meta.get("dataset") or {}
    return {
        "number": v.number, "id": v.id, "ref": v.ref, "kind": v.kind, "created": when_short(v.created_at),
        "created_full": when(v.created_at),
        "parent": parent_label(v),
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
    """Seconds from the run's start to its end (or to now, while it runs); None before it started (time in
    the queue is not the run's)."""
    start = _parse(record.started_at)
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


def queue_place(position: int | None) -> str:
    """What a waiting training's progress says: its place in the queue (0-based ``position``), when known."""
    if position is None:
        return "waiting to start"
    ahead = f"{position} training{'' if position == 1 else 's'} ahead" if position else "next to start"
    return f"queued: #{position + 1} in line ({ahead})"


def training_view(record: TrainingRecord, rows: list[dict[str, Any]] | None = None,
                  position: int | None = None) -> dict[str, Any]:
    """A training for its page and for the Trainings tab; ``rows`` (metrics.jsonl) add progress and ETA;
    ``position`` is its 0-based place in the queue while it waits."""
    version = (record.output or {}).get("version")
    view = {
        "id": record.id, "status": str(record.status), "final": record.status in FINAL,
        "destination": record.destination,
        "trainer": source_label(record.model or (record.input or {}).get("base_model") or "–"),
        "created": when(record.created_at), "duration": seconds(duration_s(record)),
        "error": record.error, "version": version, "version_number": version_number(version),
        "where": placement_text(record.placement),
    }
    if rows is not None:
        progress = training_progress(record, rows)
        total = progress["total_steps"]
        if progress["step"]:
            view["progress"] = f"step {progress['step']} of {total}" if total else f"step {progress['step']}"
        elif record.status == "starting":
            view["progress"] = queue_place(position)
        elif record.status == "processing":
            view["progress"] = "loading the model and data"
        else:
            view["progress"] = "–"
        view["tokens_per_s"] = number(progress["tokens_per_s"], 0) if progress["tokens_per_s"] else "–"
        if view["final"]:
            view["eta"] = "–"
        elif progress["eta_s"] is not None:
            view["eta"] = seconds(progress["eta_s"])
        else:
            view["eta"] = "measuring after the first steps" if record.status == "processing" else "–"
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

