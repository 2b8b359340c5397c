"""``finetune versions``: list, show, verify, delete, alias and compare versions."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import UsageError
from ..names import parse_ref
from ..registry.summary import damage, metrics_summary, parent_summary
from .common import add_command, open_registry, print_json, table
from .use import add_generation_options, generation_settings, quiet


def cmd_versions_list(args: argparse.Namespace) -> None:
    if args.limit < 0:  # a negative slice would silently drop the *oldest* versions instead
        raise UsageError(f"--limit must be 0 or more, not {args.limit}")
    reg = open_registry(args)
    versions = reg.list_versions(args.model, manifests=True, limit=args.limit or None)  # through the index
    damaged = {v.number: problem for v in versions if (problem := damage(v)) is not None}
    if args.json:
        return print_json([{"ref": v.ref, "number": v.number, "damaged": damaged[v.number]} if v.number in damaged
                           else {"ref": v.ref, "number": v.number, "id": v.id, "created_at": v.created_at,
                                 "kind": v.kind, "parent": v.parent, "metrics": v.metadata.get("metrics", {})}
                           for v in versions])
    if not versions:
        print(f"{args.model} has no versions yet")
        return
    table([[str(v.number), "-", "-", "DAMAGED", "-", damaged[v.number]] if v.number in damaged else
           [str(v.number), v.id[:12], v.created_at[:19].replace("T", " "), v.kind, parent_summary(v),
            metrics_summary(v)] for v in versions], ["N", "ID", "CREATED", "KIND", "PARENT", "METRICS"])
    if damaged:
        first = f"{args.model}:{min(damaged)}"
        print(f"{len(damaged)} damaged version{'s' if len(damaged) > 1 else ''}: `finetune versions verify {first}` "
              f"lists what is wrong, `finetune versions delete {first}` removes it", file=sys.stderr)


def cmd_versions_show(args: argparse.Namespace) -> None:
    from ..registry.lineage import describe_version

    reg = open_registry(args)
    v = reg.resolve(args.ref)
    if args.json:
        return print_json(v.manifest)
    print(describe_version(reg, v))


def cmd_versions_verify(args: argparse.Namespace) -> int:
    reg = open_registry(args)
    v = reg.resolve(args.ref)
    kind = None if damage(v) else v.kind
    if kind == "base":  # its files, and a hub base's files in the Hugging Face cache
        from ..registry.integrity import base_problems

        problems = base_problems(reg, v, full=True)
    else:
        problems = reg.verify(v)
    if not problems and kind == "adapter":  # its own files are intact: is its base still the one it was built on?
        from ..registry.integrity import lineage_problems
        from ..registry.sources import local_base_problem

        problem = local_base_problem(reg, v)
        problems = [f"base: {problem}"] if problem else lineage_problems(reg, v)
    for p in problems:
        print(f"{v.ref}: {p}")
    if problems:
        print(f"{v.ref}: DAMAGED ({len(problems)} problem{'s' if len(problems) > 1 else ''})", file=sys.stderr)
        return 1
    print(f"{v.ref}: ok ({len(v.manifest['files'])} files, id {v.id[:12]})")
    return 0


def cmd_versions_delete(args: argparse.Namespace) -> None:
    reg = open_registry(args)
    if parse_ref(args.ref).kind == "latest" and not args.latest:  # before resolving: the same refusal, earlier
        reg.delete_version(args.ref)
    v = reg.resolve(args.ref)
    archived = reg.delete_version(v.ref)
    print(f"deleted {v.ref}" + (" (kept in the archive for the versions of other accounts that derive from it)"
                                if archived is not None else ""))


def cmd_versions_alias(args: argparse.Namespace) -> None:
    reg = open_registry(args)
    if args.remove:
        ref = parse_ref(args.ref)
        # A ref naming a version removes the alias only if it points there; OWNER/NAME alone removes it anyway.
        named = ref.kind != "latest" and not (ref.kind == "alias" and ref.value == args.alias)
        number = reg.resolve(args.ref).number if named else None
        reg.remove_alias(ref.model, args.alias, number)
        print(f"removed alias {args.alias}")
        return
    v = reg.set_alias(args.ref, args.alias)
    print(f"{v.model}:{args.alias} -> {v.ref}")


def cmd_versions_compare(args: argparse.Namespace) -> None:
    from ..compare import compare_versions

    settings = None
    if args.prompts is not None or args.eval is not None:  # otherwise only manifests are read: no torch needed
        quiet()
        settings = generation_settings(args)
    result = compare_versions(open_registry(args), args.refs, prompts_file=args.prompts, eval_file=args.eval,
                              settings=settings, device=args.device)
    if args.json:
        return print_json(result.to_dict())
    first = result.reports[0].version.ref
    rows = []
    for r in result.reports:
        data = r.version.metadata.get("dataset") or {}
        dataset = "-"
        if data:
            name = str(data.get("path")).rsplit("/", 1)[-1]
            dataset = f"{name} ({data.get('rows')} rows, {str(data.get('sha256'))[:8]})"
        if r.config_changes is None:
            changes = "(no training config)"
        elif r.version.ref == result.reference:
            changes = "(reference)"
        else:
            changes = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in r.config_changes.items())
        loss = f"{r.eval_loss:.4f}" if r.eval_loss is not None else "-"
        rows.append([r.version.ref, r.version.id[:12], parent_summary(r.version), dataset, loss, changes or "(same)"])
    table(rows, ["VERSION", "ID", "PARENT", "DATASET", "EVAL LOSS", f"CONFIG CHANGES vs {result.reference or '-'}"])
    if result.eval_file:
        print(f"\neval: {result.eval_file}: {result.eval_rows} rows, {result.eval_label_tokens} label tokens, "
              f"encoded once with {first}'s prompt format and tokenizer")
    width = max(len(r.version.ref) for r in result.reports)
    for i, prompt in enumerate(result.prompts):
        print(f"\nprompt {i + 1}: {_short(prompt, 200)}")
        for r in result.reports:
            print(f"  {r.version.ref:<{width}}  {_short(r.answers[i], 500)}")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"



def add_commands(groups: argparse._SubParsersAction) -> None:
    versions = groups.add_parser("versions", help="versions of a model").add_subparsers(dest="cmd", required=True)
    p = add_command(versions, "list", cmd_versions_list, "list versions, newest first")
    p.add_argument("model", metavar="OWNER/NAME")
    p.add_argument("--limit", type=int, default=0, help="show at most N versions")
    p.add_argument("--json", action="store_true")
    p = add_command(versions, "show", cmd_versions_show, "show a version: manifest summary and lineage")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p = add_command(versions, "verify", cmd_versions_verify, "re-hash every file of a version against its manifest")
    p.add_argument("ref", metavar="REF")
    p = add_command(versions, "delete", cmd_versions_delete,
                    "delete a version, named explicitly (OWNER/NAME:N); numbers are never reused")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--latest", action="store_true", help="allow REF to be OWNER/NAME (its newest version)")
    p = add_command(versions, "alias", cmd_versions_alias,
                    "point ALIAS at a version (OWNER/NAME:ALIAS then resolves to it)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("--remove", action="store_true", help="remove the alias instead")
    p = add_command(versions, "compare", cmd_versions_compare,
             "compare versions: parent, data, config changes, eval loss on one file, answers to the same prompts")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("--prompts", metavar="FILE", help="JSONL of prompts to answer with every version")
    p.add_argument("--eval", metavar="FILE", help="data file to compute every version's eval loss on")
    p.add_argument("--json", action="store_true")
    add_generation_options(p)
