"""``finetune models``: create, list, show, delete and import destination models."""

from __future__ import annotations

import argparse
import sys

from ..registry import HARDWARE, VISIBILITIES
from ..registry.summary import model_summary
from .common import add_command, open_registry, print_json, printable, table


def cmd_models_create(args: argparse.Namespace) -> None:
    # Options left out are None: with --exist-ok only those given are compared with the model's (a difference is
    # refused, never ignored).
    m = open_registry(args).create_model(
        args.model, description=args.description, visibility=args.visibility, hardware=args.hardware,
        exist_ok=args.exist_ok,
    )
    print(f"created {m.full_name}" if not args.exist_ok else f"model {m.full_name} ready")


def cmd_models_list(args: argparse.Namespace) -> None:
    reg = open_registry(args)
    rows = [model_summary(reg, m) for m in reg.list_models()]
    damaged = reg.damaged_models()
    if args.json:
        return print_json(rows + [{"damaged": err.message} for err in damaged])
    for err in damaged:  # listed apart, so one bad model.json never hides the others
        print(f"finetune: warning: {err}", file=sys.stderr)
    if not rows:
        if not damaged:
            print(f"no models in {reg.root} (create one with `finetune models create OWNER/NAME`)")
        return
    table([[r["model"], str(r["versions"]), r["latest"] or "-", r["visibility"], r["hardware"],
            printable(r["description"])] for r in rows],
          ["MODEL", "VERSIONS", "LATEST", "VISIBILITY", "HARDWARE", "DESCRIPTION"])


def cmd_models_show(args: argparse.Namespace) -> None:
    reg = open_registry(args)
    m = reg.get_model(args.model)
    info = {**model_summary(reg, m), "aliases": reg.aliases(m.full_name), "path": str(m.path)}
    if args.json:
        return print_json(info)
    for key in ("model", "description", "visibility", "hardware", "created_at", "versions", "latest", "path"):
        print(f"{key + ':':13}{printable(str(info[key])) if info[key] not in (None, '') else '-'}")
    aliases = ", ".join(f"{a} -> {m.full_name}:{n}" for a, n in sorted(info["aliases"].items())) or "-"
    print(f"{'aliases:':13}{aliases}")


def cmd_models_delete(args: argparse.Namespace) -> None:
    open_registry(args).delete_model(args.model)
    print(f"deleted {args.model}")


def cmd_models_import(args: argparse.Namespace) -> None:
    from ..registry.sources import import_base

    v = import_base(open_registry(args), args.model, args.source, revision=args.revision, description=args.description)
    print(v.ref)



def add_commands(groups: argparse._SubParsersAction) -> None:
    models = groups.add_parser("models", help="destination models").add_subparsers(dest="cmd", required=True)
    p = add_command(models, "create", cmd_models_create, "create a destination model OWNER/NAME")
    p.add_argument("model", metavar="OWNER/NAME")
    p.add_argument("--description", default=None, help="(default: none)")
    p.add_argument("--visibility", choices=VISIBILITIES, default=None, help="(default: private)")
    p.add_argument("--hardware", choices=HARDWARE, default=None, help="(default: auto)")
    p.add_argument("--exist-ok", action="store_true",
                   help="succeed if the model exists already with the settings given")
    p = add_command(models, "list", cmd_models_list, "list models")
    p.add_argument("--json", action="store_true")
    p = add_command(models, "show", cmd_models_show, "show a model's fields, version count and latest version")
    p.add_argument("model", metavar="OWNER/NAME")
    p.add_argument("--json", action="store_true")
    p = add_command(models, "delete", cmd_models_delete, "delete a model that has no versions")
    p.add_argument("model", metavar="OWNER/NAME")
    p = add_command(models, "import", cmd_models_import, "register a base model (local folder or hub id) as a version")
    p.add_argument("model", metavar="OWNER/NAME")
    p.add_argument("--from", dest="source", required=True, metavar="PATH_OR_HUB_ID")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    p.add_argument("--description", default="")
