"""Inference sub-commands of `mupd` (stain, generate); training, data, eval and serve live
beside their own code and register themselves the same way."""

from __future__ import annotations

import argparse
from typing import Any, Callable


def request_arg(cls: type, name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse `type` of an option that is field `name` of request `cls`: parsed by `parse`, then
    checked as the server checks it (`wire.check_field`: type, range, valid UTF-8), so a bad value
    is refused with the same words while the arguments are parsed, before any compute."""
    from ..engine.wire import WireError, check_field

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r}: not a number") from None
        try:
            return check_field(cls, name, value)
        except WireError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert
