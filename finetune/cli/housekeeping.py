"""``finetune registry``: housekeeping of the registry root."""

from __future__ import annotations

import argparse

from .common import add_command, open_registry


def cmd_registry_gc(args: argparse.Namespace) -> None:
    reg = open_registry(args)
    removed = reg.gc(older_than_hours=args.older_than, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for p in reg.repair_counters(dry_run=args.dry_run):
        print(f"{'would rebuild' if args.dry_run else 'rebuilt'} {p} from the versions on disk")
    for p in removed:
        print(f"{verb} {p}")
    print(f"{verb} {len(removed)} leftover{'s' if len(removed) != 1 else ''} in {reg.root}")



def add_commands(groups: argparse._SubParsersAction) -> None:
    registry = groups.add_parser("registry", help="registry housekeeping").add_subparsers(dest="cmd", required=True)
    p = add_command(registry, "gc", cmd_registry_gc, "remove leftovers of interrupted publishes and deletions")
    p.add_argument("--older-than", type=float, default=24.0, metavar="HOURS", help="only leftovers older than this")
    p.add_argument("--dry-run", action="store_true")
