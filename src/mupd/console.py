"""A terminal progress bar fed by the same ProgressEvents the server and the plugin receive."""

from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm

from .progress import ProgressEvent


class ConsoleProgress:
    """One bar per stage; `prefix` goes before the stage's name, `position` and `leave` are
    tqdm's (a bar under another, removed when done)."""

    def __init__(self, prefix: str = "", position: Optional[int] = None, leave: bool = True) -> None:
        self._bar: Optional[tqdm] = None
        self._stage = ""
        self.prefix, self.position, self.leave = prefix, position, leave

    def __call__(self, event: ProgressEvent) -> None:
        if self._bar is None or event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total, desc=f"{self.prefix}{event.stage}", unit="step",
                             leave=self.leave, position=self.position)
        self._bar.n = event.step
        if event.metrics:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in event.metrics.items()}, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CohortBars:
    """`mupd stain` over a cohort: a bar of this process's slides and, under it, one of the
    tiles of the slide in hand (events of `mupd.cohort.stain_cohort`)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.slides = ConsoleProgress(prefix, position=0)
        self.tiles = ConsoleProgress(prefix, position=1, leave=False)

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == "slides":  # a slide begins (its name is the message) or all are done
            self.tiles.close()
            self.tiles = ConsoleProgress(f"{self.prefix}{event.message} ", position=1, leave=False)
            self.slides(event)
        else:
            self.tiles(event)

    def close(self) -> None:
        self.tiles.close()
        self.slides.close()


def console_line(message: str) -> None:
    """A line on stdout above the bars, flushed (a log piped to a file survives a kill)."""
    tqdm.write(message)
    sys.stdout.flush()
