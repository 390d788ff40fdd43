"""One device call at a time: a first-come, first-served queue that fine-tune jobs share."""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ...progress import CancelToken
from .errors import DeviceBusy


@dataclass(eq=False)
class _Ticket:
    label: str
    cancel: CancelToken
    job: bool


class DeviceSlot:
    """First come, first served use of one device; at most `max_waiting` inference calls wait.

    While a fine-tune job holds the device, inference is turned away at once (503) rather
    than left waiting for the whole training run.
    """

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._queue: deque[_Ticket] = deque()
        self._holder: Optional[_Ticket] = None

    def _refuse_if_job_holds(self) -> None:
        if self._holder is not None and self._holder.job:
            raise DeviceBusy(f"the device is busy with {self._holder.label}", retry_after=30)

    def enqueue(self, label: str, cancel: CancelToken, job: bool = False) -> _Ticket:
        with self._cond:
            if not job:
                self._refuse_if_job_holds()
                waiting = sum(not t.job for t in self._queue)
                if waiting >= self.max_waiting:
                    raise DeviceBusy(f"{waiting} requests already wait for the device", retry_after=2)
            ticket = _Ticket(label, cancel, job)
            self._queue.append(ticket)
            return ticket

    @contextmanager
    def hold(self, ticket: _Ticket) -> Iterator[None]:
        with self._cond:
            try:
                while not (self._holder is None and self._queue[0] is ticket):
                    ticket.cancel.raise_if_cancelled()
                    if not ticket.job:
                        self._refuse_if_job_holds()
                    self._cond.wait(0.1)
                ticket.cancel.raise_if_cancelled()
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._holder = ticket
        try:
            yield
        finally:
            with self._cond:
                self._holder = None
                self._cond.notify_all()

    @contextmanager
    def job_gate(self, label: str, cancel: CancelToken) -> Iterator[None]:
        with self.hold(self.enqueue(label, cancel, job=True)):
            yield

    def state(self) -> dict[str, Any]:
        with self._cond:
            return {"running": self._holder.label if self._holder else None,
                    "waiting": len(self._queue)}
