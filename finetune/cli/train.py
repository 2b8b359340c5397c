"""``finetune train`` and ``finetune trainings``: start or resume a run, and follow, inspect or cancel runs."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from .common import add_command, open_registry, print_json, table


def cmd_train(args: argparse.Namespace) -> None:
    from ..config import load_config
    from ..training.run import run_training, train

    if args.config is None and args.resume is None:
        raise UsageError("give a CONFIG.yaml, or --resume TRAINING_ID")
    if args.resume and (args.config or args.overrides):
        raise UsageError("--resume continues a run with its own config", "drop CONFIG and --set when resuming")
    reg = open_registry(args)
    if args.resume:
        result = run_training(args.resume, registry=reg, progress=not args.quiet)
    else:
        result = train(
            load_config(args.config, args.overrides), registry=reg, destination=args.destination,
            create_destination=args.create_destination, progress=not args.quiet,
            # stdout is kept for the version ref. The id (for `trainings logs|cancel` and --resume) reaches stderr
            # as the log's first line, which --quiet silences: then say it here.
            on_start=(lambda training_id: print(f"training {training_id}", file=sys.stderr, flush=True))
            if args.quiet else None,
        )
    if result.version is not None:
        print(result.version.ref)


def _trainings(args: argparse.Namespace):
    from ..registry.jobs import Trainings

    return Trainings(open_registry(args))


def cmd_trainings_list(args: argparse.Namespace) -> None:
    trainings = _trainings(args)
    records = trainings.list()
    for err in trainings.damaged():  # listed apart, so one bad record never hides the others
        print(f"finetune: warning: {err}", file=sys.stderr)
    if args.json:
        return print_json([r.to_dict() for r in records])
    if not records:
        print("no trainings yet")
        return
    rows = []
    for r in records:
        status = "processing (process gone)" if trainings.is_stale(r) and r.status == "processing" else r.status
        out = (r.output or {}).get("version") or "-"
        rows.append([r.id, status, r.destination, r.model or "-", out, r.created_at[:19].replace("T", " ")])
    table(rows, ["ID", "STATUS", "DESTINATION", "MODEL", "VERSION", "CREATED"])


def cmd_trainings_show(args: argparse.Namespace) -> None:
    trainings = _trainings(args)
    record = trainings.get(args.id)
    info = record.to_dict()
    paths = trainings.paths(record.id)
    info["log"] = str(paths.log)
    info["metrics_file"] = str(paths.metrics)
    print_json(info)


def cmd_trainings_logs(args: argparse.Namespace) -> None:
    for line in _trainings(args).follow_log(args.id, follow=args.follow):
        print(line, flush=True)


def cmd_trainings_cancel(args: argparse.Namespace) -> None:
    record = _trainings(args).request_cancel(args.id)
    print(f"cancel requested for {record.id}")



def add_commands(groups: argparse._SubParsersAction) -> None:
    p = add_command(groups, "train", cmd_train,
                    "train a LoRA adapter and publish it as a new version of the destination")
    p.add_argument("config", nargs="?", metavar="CONFIG.yaml")
    p.add_argument("--destination", metavar="OWNER/NAME", help="the model that receives the version")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--create-destination", action="store_true", help="create the destination if it does not exist")
    p.add_argument("--resume", metavar="TRAINING_ID", help="continue a killed, failed or canceled run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    trainings = groups.add_parser("trainings", help="training runs").add_subparsers(dest="cmd", required=True)
    p = add_command(trainings, "list", cmd_trainings_list, "list training runs, newest first")
    p.add_argument("--json", action="store_true")
    p = add_command(trainings, "show", cmd_trainings_show, "show a training record")
    p.add_argument("id", metavar="ID")
    p = add_command(trainings, "logs", cmd_trainings_logs, "print a training's log")
    p.add_argument("id", metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the training ends")
    p = add_command(trainings, "cancel", cmd_trainings_cancel, "stop a running training (it publishes nothing)")
    p.add_argument("id", metavar="ID")
