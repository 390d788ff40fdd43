"""What the server refuses, each answered with its own HTTP status (see `app.create_app`)."""

from __future__ import annotations

from ...errors import MuPDError


class AccessDenied(MuPDError):
    """A path outside the server's configured roots (HTTP 403)."""


class NotFound(MuPDError):
    """An unknown job / request id, or a missing file (HTTP 404)."""


class TooLarge(MuPDError):
    """A request or the work it asks for exceeds the server's limits (HTTP 413)."""


class DeviceBusy(MuPDError):
    """The device queue is full or a fine-tune job holds the device (HTTP 503)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
