"""Engine calls off the Qt thread, with a napari progress bar, Cancel and readable errors.

The engine reports progress through a plain callback from whatever thread runs it; a napari
`thread_worker` generator runs the call in a helper thread and re-yields those events, so the
progress bar and the results are only ever touched on the main thread and the UI never waits.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Iterator, Optional

from magicgui.widgets import Container, PushButton
from napari.qt.threading import thread_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info

from mupd.errors import CancelledError, MuPDError
from mupd.progress import CancelToken, ProgressCallback, ProgressEvent

log = logging.getLogger(__name__)

EngineCall = Callable[[ProgressCallback, CancelToken], Any]


def describe_error(exc: BaseException) -> str:
    """The message a pathologist sees: ours as written, anything else with its type."""
    if isinstance(exc, MuPDError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def notify_error(exc: BaseException, what: str) -> None:
    if isinstance(exc, CancelledError):
        show_info(f"{what} cancelled")
        return
    if not isinstance(exc, MuPDError):
        log.error("%s failed", what, exc_info=exc)
    show_error(f"{what} failed: {describe_error(exc)}")


def _relay(call: EngineCall, cancel: CancelToken) -> Iterator[ProgressEvent]:
    events: "queue.Queue[ProgressEvent]" = queue.Queue()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = call(events.put, cancel)
        except BaseException as exc:  # handed back to the worker thread below
            box["error"] = exc

    runner = threading.Thread(target=target, name="mupd-engine-call", daemon=True)
    runner.start()
    while runner.is_alive() or not events.empty():
        try:
            yield events.get(timeout=0.05)
        except queue.Empty:
            pass
    if "error" in box:
        raise box["error"]
    return box.get("result")


class EngineTask:
    """One running engine call: `cancel()` asks it to stop between batches."""

    def __init__(self, call: EngineCall, what: str, on_done: Callable[[Any], None],
                 on_finished: Optional[Callable[[], None]] = None,
                 on_error: Optional[Callable[[BaseException], None]] = None,
                 on_progress: Optional[Callable[[ProgressEvent], None]] = None) -> None:
        self.what = what
        self.token = CancelToken()
        self.error: Optional[BaseException] = None
        self.done = False
        self._bar: Optional[napari_progress] = None
        worker = thread_worker(_relay, start_thread=False, ignore_errors=True)(call, self.token)
        worker.yielded.connect(self._on_progress)
        if on_progress is not None:
            worker.yielded.connect(on_progress)
        worker.returned.connect(on_done)
        worker.errored.connect(self._on_error)
        if on_error is not None:
            worker.errored.connect(on_error)
        worker.finished.connect(self._on_finished)
        if on_finished is not None:
            worker.finished.connect(on_finished)
        self.worker = worker

    def start(self) -> "EngineTask":
        self._bar = napari_progress(total=0, desc=self.what)
        self.worker.start()
        return self

    def cancel(self) -> None:
        self.token.cancel()

    def _on_progress(self, event: ProgressEvent) -> None:
        bar = self._bar
        if bar is None:
            return
        if event.total and bar.total != event.total:
            bar.total = event.total
        if event.step > bar.n:
            bar.update(event.step - bar.n)
        bar.set_description(f"{self.what}: {event.message or event.stage}")

    def _on_error(self, exc: BaseException) -> None:
        self.error = exc
        notify_error(exc, self.what)

    def _on_finished(self) -> None:
        self.done = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RunCancel(Container):
    """The Run / Cancel pair of a panel: Run is off and Cancel on while the panel's task runs."""

    def __init__(self, text: str) -> None:
        self.run = PushButton(text=text)
        self.cancel = PushButton(text="Cancel", enabled=False)
        super().__init__(widgets=[self.run, self.cancel], layout="horizontal", labels=False)

    def busy(self, on: bool) -> None:
        self.run.enabled = not on
        self.cancel.enabled = on


_loading: list[EngineTask] = []


def ensure_engine() -> Optional[EngineTask]:
    """Load the local engine with the bundled model in the background, unless one is set or loading."""
    from ._session import session

    if session().current_info is not None or any(not t.done for t in _loading):
        return None
    task = EngineTask(lambda progress, cancel: session().engine(), "Loading the MuPD engine",
                      on_done=lambda _engine: None)
    _loading[:] = [task]
    return task.start()
