"""The ``finetune`` command line. Each sub-command is a thin wrapper over the Python API.

One module per command group (``models``, ``versions``, ``train`` with ``trainings``, ``use`` for predict, chat
and export, ``housekeeping`` for ``registry gc``, ``serve`` and ``tokens`` for the HTTP service). Errors the
user can cause print one line (``finetune: error: ...``) and exit 2 for usage errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import FinetuneError
from . import housekeeping, models, serve, tokens, train, use, versions

_GROUPS = (models, versions, train, housekeeping, use, serve, tokens)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other error) and still exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        commands = self._missing_command(message)
        if commands:
            message = f"`{self.prog}` needs a command: {', '.join(commands)}"
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def _missing_command(self, message: str) -> list[str]:
        """The sub-commands to list when the error is that none was given (argparse says "required: cmd")."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and action.required:
                names = (action.metavar or action.dest or "",)
                if message.startswith("the following arguments are required") and any(
                        n and n in message for n in names):
                    return list(action.choices)
        return []


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finetune", description="LoRA fine-tuning with a versioned model registry.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    parser.add_argument("--registry", metavar="PATH", default=None,
                        help="registry root (default: $FINETUNE_HOME, else ./registry)")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for module in _GROUPS:
        module.add_commands(groups)
    return parser


_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC)


def _registry_root(args: argparse.Namespace):
    from ..registry import Registry

    try:
        return Registry(args.registry)
    except Exception:
        return None


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
    except OSError as err:  # a write the registry's own checks did not foresee: still one line, naming the way out
        reg_root = _registry_root(args)
        if err.errno in _NOT_WRITABLE and err.filename and reg_root is not None and reg_root.contains(err.filename):
            from ..registry.disk import not_writable

            print(f"finetune: error: {not_writable(reg_root.root, err)}", file=sys.stderr)
            return 1
        if isinstance(err, BrokenPipeError):  # `finetune ... | head`: the reader left; not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
