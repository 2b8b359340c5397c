"""The ``finetune`` command line. Each sub-command is a thin wrapper over the Python API.

Errors the user can cause print one line (``finetune: error: ...``) and exit 2 for usage errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .errors import FinetuneError, UsageError
from .names import parse_ref
from .registry import HARDWARE, VISIBILITIES, Model, Registry, Version


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _metrics_summary(version: Version) -> str:
    metrics = version.metadata.get("metrics", {})
    parts = []
    for key in ("train_loss", "eval_loss"):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{key}={metrics[key]:.4f}")
    return " ".join(parts)


def _parent_summary(version: Version) -> str:
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


# ------------------------------------------------------------------ models
def cmd_models_create(args: argparse.Namespace) -> None:
    m = _registry(args).create_model(
        args.model, description=args.description, visibility=args.visibility, hardware=args.hardware,
        exist_ok=args.exist_ok,
    )
    print(f"created {m.full_name}" if not args.exist_ok else f"model {m.full_name} ready")


def _model_info(reg: Registry, m: Model) -> dict[str, Any]:
    versions = reg.list_versions(m.full_name)  # newest first: the latest is its head
    return {**m.to_dict(), "model": m.full_name, "versions": len(versions),
            "latest": versions[0].ref if versions else None}


def cmd_models_list(args: argparse.Namespace) -> None:
    reg = _registry(args)
    rows = [_model_info(reg, m) for m in reg.list_models()]
    if args.json:
        return _print_json(rows)
    if not rows:
        print(f"no models in {reg.root} (create one with `finetune models create OWNER/NAME`)")
        return
    _table([[r["model"], str(r["versions"]), r["latest"] or "-", r["visibility"], r["hardware"], r["description"]]
            for r in rows], ["MODEL", "VERSIONS", "LATEST", "VISIBILITY", "HARDWARE", "DESCRIPTION"])


def cmd_models_show(args: argparse.Namespace) -> None:
    reg = _registry(args)
    m = reg.get_model(args.model)
    info = {**_model_info(reg, m), "aliases": reg.aliases(m.full_name), "path": str(m.path)}
    if args.json:
        return _print_json(info)
    for key in ("model", "description", "visibility", "hardware", "created_at", "versions", "latest", "path"):
        print(f"{key + ':':13}{info[key] if info[key] not in (None, '') else '-'}")
    aliases = ", ".join(f"{a} -> {m.full_name}:{n}" for a, n in sorted(info["aliases"].items())) or "-"
    print(f"{'aliases:':13}{aliases}")


def cmd_models_delete(args: argparse.Namespace) -> None:
    _registry(args).delete_model(args.model)
    print(f"deleted {args.model}")


def cmd_models_import(args: argparse.Namespace) -> None:
    from .sources import import_base

    v = import_base(_registry(args), args.model, args.source, revision=args.revision, description=args.description)
    print(v.ref)


# ------------------------------------------------------------------ versions
def cmd_versions_list(args: argparse.Namespace) -> None:
    if args.limit < 0:  # a negative slice would silently drop the *oldest* versions instead
        raise UsageError(f"--limit must be 0 or more, not {args.limit}")
    reg = _registry(args)
    versions = reg.list_versions(args.model)
    if args.limit:
        versions = versions[: args.limit]
    if args.json:
        return _print_json([{"ref": v.ref, "number": v.number, "id": v.id, "created_at": v.created_at,
                             "kind": v.kind, "parent": v.parent, "metrics": v.metadata.get("metrics", {})}
                            for v in versions])
    if not versions:
        print(f"{args.model} has no versions yet")
        return
    _table([[str(v.number), v.id[:12], v.created_at[:19].replace("T", " "), v.kind, _parent_summary(v),
             _metrics_summary(v)] for v in versions], ["N", "ID", "CREATED", "KIND", "PARENT", "METRICS"])


def cmd_versions_show(args: argparse.Namespace) -> None:
    from .lineage import describe_version

    reg = _registry(args)
    v = reg.resolve(args.ref)
    if args.json:
        return _print_json(v.manifest)
    print(describe_version(reg, v))


def cmd_versions_verify(args: argparse.Namespace) -> int:
    reg = _registry(args)
    v = reg.resolve(args.ref)
    problems = reg.verify(v)
    for p in problems:
        print(f"{v.ref}: {p}")
    if problems:
        print(f"{v.ref}: DAMAGED ({len(problems)} problem{'s' if len(problems) > 1 else ''})", file=sys.stderr)
        return 1
    print(f"{v.ref}: ok ({len(v.manifest['files'])} files, id {v.id[:12]})")
    return 0


def cmd_versions_delete(args: argparse.Namespace) -> None:
    reg = _registry(args)
    v = reg.resolve(args.ref)
    reg.delete_version(v.ref)
    print(f"deleted {v.ref}")


def cmd_versions_alias(args: argparse.Namespace) -> None:
    reg = _registry(args)
    if args.remove:
        reg.remove_alias(parse_ref(args.ref).model, args.alias)
        print(f"removed alias {args.alias}")
        return
    v = reg.set_alias(args.ref, args.alias)
    print(f"{v.model}:{args.alias} -> {v.ref}")


# ------------------------------------------------------------------ registry
def cmd_registry_gc(args: argparse.Namespace) -> None:
    reg = _registry(args)
    removed = reg.gc(older_than_hours=args.older_than, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for p in removed:
        print(f"{verb} {p}")
    print(f"{verb} {len(removed)} leftover{'s' if len(removed) != 1 else ''} in {reg.root}")


# ------------------------------------------------------------------ training
def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .train import run_training

    if args.config is None and args.resume is None:
        raise UsageError("give a CONFIG.yaml, or --resume TRAINING_ID")
    if args.resume and (args.config or args.overrides):
        raise UsageError("--resume continues a run with its own config", "drop CONFIG and --set when resuming")
    config = load_config(args.config, args.overrides) if args.config else None
    result = run_training(
        config, registry=_registry(args), destination=args.destination,
        create_destination=args.create_destination, resume=args.resume, progress=not args.quiet,
        # stdout is kept for the version ref. The id (for `trainings logs|cancel` and --resume) reaches stderr as
        # the log's first line, which --quiet silences: then say it here.
        on_start=(lambda training_id: print(f"training {training_id}", file=sys.stderr, flush=True))
        if args.quiet else None,
    )
    if result.version is not None:
        print(result.version.ref)


def _trainings(args: argparse.Namespace):
    from .trainings import Trainings

    return Trainings(_registry(args))


def cmd_trainings_list(args: argparse.Namespace) -> None:
    trainings = _trainings(args)
    records = trainings.list()
    if args.json:
        return _print_json([r.to_dict() for r in records])
    if not records:
        print("no trainings yet")
        return
    rows = []
    for r in records:
        status = "processing (process gone)" if trainings.is_stale(r) and r.status == "processing" else r.status
        out = (r.output or {}).get("version") or "-"
        rows.append([r.id, status, r.destination, r.model or "-", out, r.created_at[:19].replace("T", " ")])
    _table(rows, ["ID", "STATUS", "DESTINATION", "MODEL", "VERSION", "CREATED"])


def cmd_trainings_show(args: argparse.Namespace) -> None:
    trainings = _trainings(args)
    record = trainings.get(args.id)
    info = record.to_dict()
    info["log"] = str(trainings.log_path(record.id))
    info["metrics_file"] = str(trainings.metrics_path(record.id))
    _print_json(info)


def cmd_trainings_logs(args: argparse.Namespace) -> None:
    for line in _trainings(args).follow_log(args.id, follow=args.follow):
        print(line, flush=True)


def cmd_trainings_cancel(args: argparse.Namespace) -> None:
    record = _trainings(args).request_cancel(args.id)
    print(f"cancel requested for {record.id}")


# ------------------------------------------------------------------ using versions
def _generation(args: argparse.Namespace):
    from .inference import GenerationSettings

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    settings.check()  # before a model is loaded
    return settings


def _quiet() -> None:
    from .runlog import quiet_libraries

    quiet_libraries()  # stdout is the answer; loaders' progress bars and notices would only clutter stderr


def _load_for_inference(args: argparse.Namespace, version: Version):
    from .inference import load_version

    # version.ref names the exact number: a `:latest` published meanwhile must not swap the model under us.
    return load_version(_registry(args), version.ref, device=args.device)


def cmd_predict(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.file is None):
        raise UsageError("give either a PROMPT or --file PROMPTS.jsonl", 'e.g. finetune predict REF "Name a color."')
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty", "give the text to complete")
    version = _registry(args).resolve(args.ref)  # an unknown ref fails before the seconds of importing torch
    _quiet()
    from .inference import generate, load_prompts, prompt_format_of

    settings = _generation(args)
    prompts = load_prompts(args.file, prompt_format_of(version)) if args.file is not None else None
    loaded = _load_for_inference(args, version)
    if prompts is None:
        print(generate(loaded, args.prompt, settings, system=args.system))
        return
    for prompt in prompts:
        fields = {k: v for k, v in (prompt.record or {}).items() if v is not None}
        completion = generate(loaded, prompt, settings, system=args.system)
        print(json.dumps({**fields, "completion": completion}, ensure_ascii=False), flush=True)


def cmd_chat(args: argparse.Namespace) -> None:
    version = _registry(args).resolve(args.ref)
    _quiet()
    from .inference import chat, require_chat

    if version.kind != "base":  # a base may chat if its tokenizer has a template: known once that is loaded
        require_chat(version)  # refuse before the seconds of loading a model
    settings = _generation(args)
    loaded = _load_for_inference(args, version)
    replies = chat(loaded, _stdin_lines(), settings, system=args.system)
    if sys.stdin.isatty():
        print(f"chatting with {loaded.version.ref}; /reset starts over, /exit (or Ctrl-D) ends", file=sys.stderr)
    for reply in replies:
        print(reply, flush=True)


def _stdin_lines():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export

    _quiet()
    out = export(_registry(args), args.ref, args.out_dir, format=args.format, dtype=args.dtype)
    print(out)


def cmd_versions_compare(args: argparse.Namespace) -> None:
    from .compare import compare_versions

    settings = None
    if args.prompts is not None or args.eval is not None:  # otherwise only manifests are read: no torch needed
        _quiet()
        settings = _generation(args)
    result = compare_versions(_registry(args), args.refs, prompts_file=args.prompts, eval_file=args.eval,
                              settings=settings, device=args.device)
    if args.json:
        return _print_json(result.to_dict())
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
        rows.append([r.version.ref, r.version.id[:12], _parent_summary(r.version), dataset, loss, changes or "(same)"])
    _table(rows, ["VERSION", "ID", "PARENT", "DATASET", "EVAL LOSS", f"CONFIG CHANGES vs {result.reference or '-'}"])
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


# ------------------------------------------------------------------ parser
def _add(sub: argparse._SubParsersAction, name: str, func: Callable, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=func)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other error) and still exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finetune", description="LoRA fine-tuning with a versioned model registry.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    parser.add_argument("--registry", metavar="PATH", default=None,
                        help="registry root (default: $FINETUNE_HOME, else ./registry)")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    models = groups.add_parser("models", help="destination models").add_subparsers(dest="cmd", required=True)
    p = _add(models, "create", cmd_models_create, "create a destination model OWNER/NAME")
    p.add_argument("model", metavar="OWNER/NAME")
    p.add_argument("--description", default="")
    p.add_argument("--visibility", choices=VISIBILITIES, default="private")
    p.add_argument("--hardware", choices=HARDWARE, default="auto")
    p.add_argument("--exist-ok", action="store_true", help="succeed if the model exists already")
    p = _add(models, "list", cmd_models_list, "list models")
    p.add_argument("--json", action="store_true")
    p = _add(models, "show", cmd_models_show, "show a model's fields, version count and latest version")
    p.add_argument("model", metavar="OWNER/NAME")
    p.add_argument("--json", action="store_true")
    p = _add(models, "delete", cmd_models_delete, "delete a model that has no versions")
    p.add_argument("model", metavar="OWNER/NAME")
    p = _add(models, "import", cmd_models_import, "register a base model (local folder or hub id) as a version")
    p.add_argument("model", metavar="OWNER/NAME")
    p.add_argument("--from", dest="source", required=True, metavar="PATH_OR_HUB_ID")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    p.add_argument("--description", default="")

    versions = groups.add_parser("versions", help="versions of a model").add_subparsers(dest="cmd", required=True)
    p = _add(versions, "list", cmd_versions_list, "list versions, newest first")
    p.add_argument("model", metavar="OWNER/NAME")
    p.add_argument("--limit", type=int, default=0, help="show at most N versions")
    p.add_argument("--json", action="store_true")
    p = _add(versions, "show", cmd_versions_show, "show a version: manifest summary and lineage")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p = _add(versions, "verify", cmd_versions_verify, "re-hash every file of a version against its manifest")
    p.add_argument("ref", metavar="REF")
    p = _add(versions, "delete", cmd_versions_delete, "delete a version (numbers are never reused)")
    p.add_argument("ref", metavar="REF")
    p = _add(versions, "alias", cmd_versions_alias, "point ALIAS at a version (OWNER/NAME:ALIAS then resolves to it)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("--remove", action="store_true", help="remove the alias instead")
    p = _add(versions, "compare", cmd_versions_compare,
             "compare versions: parent, data, config changes, eval loss on one file, answers to the same prompts")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("--prompts", metavar="FILE", help="JSONL of prompts to answer with every version")
    p.add_argument("--eval", metavar="FILE", help="data file to compute every version's eval loss on")
    p.add_argument("--json", action="store_true")
    _add_generation_options(p)

    p = _add(groups, "train", cmd_train, "train a LoRA adapter and publish it as a new version of the destination")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml")
    p.add_argument("--destination", metavar="OWNER/NAME", help="the model that receives the version")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--create-destination", action="store_true", help="create the destination if it does not exist")
    p.add_argument("--resume", metavar="TRAINING_ID", help="continue a killed, failed or canceled run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    trainings = groups.add_parser("trainings", help="training runs").add_subparsers(dest="cmd", required=True)
    p = _add(trainings, "list", cmd_trainings_list, "list training runs, newest first")
    p.add_argument("--json", action="store_true")
    p = _add(trainings, "show", cmd_trainings_show, "show a training record")
    p.add_argument("id", metavar="ID")
    p = _add(trainings, "logs", cmd_trainings_logs, "print a training's log")
    p.add_argument("id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the training ends")
    p = _add(trainings, "cancel", cmd_trainings_cancel, "stop a running training (it publishes nothing)")
    p.add_argument("id", metavar="ID")

    registry = groups.add_parser("registry", help="registry housekeeping").add_subparsers(dest="cmd", required=True)
    p = _add(registry, "gc", cmd_registry_gc, "remove leftovers of interrupted publishes and deletions")
    p.add_argument("--older-than", type=float, default=24.0, metavar="HOURS", help="only leftovers older than this")
    p.add_argument("--dry-run", action="store_true")

    p = _add(groups, "predict", cmd_predict, "complete a prompt with a version, formatted as its training did")
    p.add_argument("ref", metavar="REF")
    p.add_argument("prompt", nargs="?", metavar="PROMPT")
    p.add_argument("--file", metavar="PROMPTS.jsonl", help="one prompt per record; prints JSONL with completions")
    p.add_argument("--system", default=None, help="system prompt (versions trained on chat messages)")
    _add_generation_options(p)
    p = _add(groups, "chat", cmd_chat, "chat with a version trained on messages (stdin lines; /reset, /exit)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--system", default=None, help="system prompt")
    _add_generation_options(p)
    p = _add(groups, "export", cmd_export, "write a version to a folder: its PEFT adapter, or merged into its base")
    p.add_argument("ref", metavar="REF")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--format", choices=("adapter", "merged"), default="adapter")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weights dtype of a merged export (auto: the base model's)")
    return parser


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--device", default="auto", help="auto (follows the model's hardware), cpu, gpu or cuda:N")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``finetune`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FinetuneError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
