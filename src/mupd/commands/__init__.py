"""Inference sub-commands of `mupd` (stain, generate); training, data, eval and serve live
beside their own code and register themselves the same way."""

from __future__ import annotations

import argparse

from ..engine.api import MAX_STEPS


def steps_arg(text: str) -> int:
    """argparse type of `--steps`: 1..MAX_STEPS (the server's bound), refused while the arguments
    are parsed, before a model is loaded or a pixel read."""
    try:
        steps = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of sampling steps") from None
    if not 1 <= steps <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{steps} sampling steps: must be 1..{MAX_STEPS}")
    return steps
