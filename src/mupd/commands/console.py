"""A terminal progress bar fed by the same ProgressEvents the server and the plugin receive."""

from __future__ import annotations

from typing import Optional

from tqdm import tqdm

from ..progress import ProgressEvent


class ConsoleProgress:
    def __init__(self) -> None:
        self._bar: Optional[tqdm] = None
        self._stage = ""

    def __call__(self, event: ProgressEvent) -> None:
        if self._bar is None or event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total, desc=event.stage, unit="step", leave=True)
        self._bar.n = event.step
        if event.metrics:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in event.metrics.items()}, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
