"""Lineage: how a version descends from its base, and the human-readable account of a version."""

from __future__ import annotations

from ..errors import IntegrityError, ModelLoadError, NotFoundError
from .deletion import archived
from .manifest import Version
from .store import Registry


def lineage(reg: Registry, version: Version) -> list[Version]:
    """``version`` and its registry ancestors, down to the base (each parent checked by id). A parent its owner
    deleted while other owners' versions derived from it is found in the archive (:mod:`.deletion`)."""
    chain = [version]
    seen = {version.id}
    while True:
        parent = chain[-1].parent
        if not isinstance(parent, dict) or "ref" not in parent:
            return chain
        try:
            p: Version | None = reg.resolve(parent["ref"])
        except NotFoundError:
            p = None
        if p is None or p.id != parent.get("id"):
            p = archived(reg, parent.get("id")) or p
        if p is None:
            raise ModelLoadError(
                f"{chain[-1].ref} was trained from {parent['ref']}, which is gone from the registry",
                "restore that version (or re-import its base with `finetune models import`) to use this one",
            )
        if p.id != parent.get("id") or p.id in seen:
            raise IntegrityError(
                f"{chain[-1].ref} names parent {parent['ref']} with id {str(parent.get('id'))[:12]}, "
                f"but that ref now holds {p.id[:12]}"
            )
        seen.add(p.id)
        chain.append(p)


def _origin(version: Version) -> str:
    parent = version.parent
    if isinstance(parent, dict) and "hub_id" in parent:
        return f"hub {parent['hub_id']} @ {parent.get('revision')}"
    if isinstance(parent, dict) and "local_path" in parent:
        return f"local folder {parent['local_path']}"
    return "-"


def _hop(version: Version) -> str:
    meta = version.metadata
    dataset = meta.get("dataset", {})
    metrics = meta.get("metrics", {})
    parts = [f"{version.ref:<28} {version.id[:12]}  {version.kind:<7}"]
    if version.kind == "base":
        parts.append(_origin(version))
    if dataset:
        parts.append(f"data {dataset.get('path', '?')} ({dataset.get('rows', '?')} rows)")
    for key in ("train_loss", "eval_loss"):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{key} {metrics[key]:.4f}")
    return "  ".join(parts)


def describe_version(reg: Registry, version: Version) -> str:
    """A multi-line account of a version: fields, files, and the lineage chain down to the base."""
    m = version.manifest
    lines = [
        f"ref:         {version.ref}",
        f"id:          {version.id}",
        f"kind:        {version.kind}",
        f"created_at:  {version.created_at}",
        f"path:        {version.path}",
    ]
    meta = version.metadata
    if meta.get("training_id"):
        lines.append(f"training:    {meta['training_id']}")
    if meta.get("prompt_format"):
        lines.append(f"format:      {meta['prompt_format'].get('name')}")
    software = m.get("software", {})
    if software:
        lines.append("software:    " + ", ".join(f"{k} {v}" for k, v in sorted(software.items())))
    lines.append(f"files:       {len(m['files'])} ({sum(f['size'] for f in m['files'].values()):,} bytes)")
    for rel, info in sorted(m["files"].items()):
        lines.append(f"  {rel:<40} {info['size']:>12,}  {info['sha256'][:12]}")
    lines.append("lineage:")
    try:
        chain = lineage(reg, version)
    except (ModelLoadError, IntegrityError) as err:
        lines.append(f"  {_hop(version)}")
        lines.append(f"  !! {err}")
        return "\n".join(lines)
    for depth, v in enumerate(chain):
        lines.append(f"  {'  ' * depth}{'└─ ' if depth else ''}{_hop(v)}")
    return "\n".join(lines)
