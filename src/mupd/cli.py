"""`mupd` command line: one sub-command per feature, each a thin call into the engine.

Each feature module exposes `register(subparsers)` which adds its parser and sets
`func=callable(args) -> int`; this file only collects them and turns a MuPDError, or a file
that cannot be read (OSError, ValueError), into one line naming it and exit code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .errors import MuPDError

#: Modules that contribute sub-commands (each has `register(subparsers)`).
COMMAND_MODULES: list[str] = [
    "mupd.commands.stain",
    "mupd.commands.generate",
    "mupd.train.commands",
    "mupd.engine.server.cli",
    "mupd.eval.command",
    "mupd.data.command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mupd", description=__doc__.splitlines()[0])
    debug = "on an error, show the Python traceback instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():  # `mupd stain --debug ...` works as well
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MuPDError, OSError, ValueError) as exc:  # a bad input or file, not a bug of ours
        if args.debug:
            raise
        message = str(exc) if isinstance(exc, MuPDError) else " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"mupd {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
