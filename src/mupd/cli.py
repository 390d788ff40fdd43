"""`mupd` command line: one sub-command per feature, each a thin call into the engine.

Each feature module exposes `register(subparsers)` which adds its parser and sets
`func=callable(args) -> int`; this file only collects them and turns MuPDError into a clean
message and exit code 2.
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
    "mupd.engine.server",
    "mupd.eval.command",
    "mupd.data.command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mupd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MuPDError as exc:
        print(f"mupd {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
