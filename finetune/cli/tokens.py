"""``finetune tokens``: create, list and revoke the API tokens of the HTTP service (``finetune serve``)."""

from __future__ import annotations

import argparse

from ..registry.accounts import Accounts
from .common import add_command, open_registry, print_json, printable, table


def cmd_tokens_create(args: argparse.Namespace) -> None:
    token = Accounts(open_registry(args)).create_token(args.owner, label=args.label)
    print(token)


def cmd_tokens_list(args: argparse.Namespace) -> None:
    reg = open_registry(args)
    tokens = Accounts(reg).list_tokens(args.owner)
    if args.json:
        return print_json([t.to_dict() for t in tokens])
    if not tokens:
        print(f"no tokens in {reg.root} (create one with `finetune tokens create OWNER`)")
        return
    table([[t.id, t.owner, t.created_at[:19].replace("T", " "), printable(t.label)] for t in tokens],
          ["ID", "OWNER", "CREATED", "LABEL"])


def cmd_tokens_revoke(args: argparse.Namespace) -> None:
    info = Accounts(open_registry(args)).revoke(args.token_id)
    print(f"revoked token {info.id} of {info.owner}")


def add_commands(groups: argparse._SubParsersAction) -> None:
    group = groups.add_parser("tokens", help="API tokens of the HTTP service")
    tokens = group.add_subparsers(dest="cmd", required=True)
    p = add_command(tokens, "create", cmd_tokens_create,
                    "create a token for OWNER (and the account, if new); prints the token once, store it now")
    p.add_argument("owner", metavar="OWNER")
    p.add_argument("--label", default="", help="a note to tell tokens apart in `tokens list`")
    p = add_command(tokens, "list", cmd_tokens_list, "list tokens (ids and owners; the tokens are not stored)")
    p.add_argument("--owner", default=None, help="only this owner's tokens")
    p.add_argument("--json", action="store_true")
    p = add_command(tokens, "revoke", cmd_tokens_revoke, "revoke a token by the ID that `tokens list` shows")
    p.add_argument("token_id", metavar="ID")
