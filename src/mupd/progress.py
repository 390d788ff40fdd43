"""One progress interface for long jobs.

The CLI progress bar, the HTTP server's event stream and the napari dialog all receive the
same `ProgressEvent`s through a plain callable, and cancel a job through the same token.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from .errors import CancelledError


@dataclass
class ProgressEvent:
    """`stage` names the phase (e.g. "tiles", "train"); `metrics` carries e.g. {"loss": 0.3}."""

    stage: str
    step: int
    total: Optional[int] = None
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """Default callback."""


class CancelToken:
    """Thread-safe cancellation flag checked by long loops between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise CancelledError("cancelled by the user")
