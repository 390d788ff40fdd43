"""Background jobs (fine-tuning) with progress history and cancellation.

One worker thread per job; the local engine and the HTTP server share this, so a job looks
the same from the CLI, the server's progress stream and the napari dialog.
"""

from __future__ import annotations

import threading
import traceback
import uuid
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional

from ..errors import CancelledError, MuPDError
from ..progress import CancelToken, ProgressEvent
from .api import JobStatus

JobFunction = Callable[[Callable[[ProgressEvent], None], CancelToken], Optional[str]]


class JobManager:
    def __init__(self) -> None:
        self._jobs: dict[str, JobStatus] = {}
        self._tokens: dict[str, CancelToken] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def submit(self, fn: JobFunction, job_id: Optional[str] = None,
               gate: Optional[Callable[[CancelToken], ContextManager]] = None) -> JobStatus:
        """Run `fn` in a thread; with `gate`, the job stays "queued" until the gate is entered
        (e.g. the server's one-job-per-device slot) and is cancellable while it waits."""
        job_id = job_id or uuid.uuid4().hex[:12]
        status = JobStatus(job_id=job_id, state="queued")
        token = CancelToken()
        with self._lock:
            self._jobs[job_id] = status
            self._tokens[job_id] = token

        def on_progress(event: ProgressEvent) -> None:
            with self._lock:
                status.state = "running"
                status.step, status.total = event.step, event.total or status.total
                status.message = event.message
                if event.metrics:
                    status.metrics = dict(event.metrics)
                    status.history.append({"step": float(event.step), **event.metrics})

        def run() -> None:
            try:
                with gate(token) if gate is not None else nullcontext():
                    with self._lock:
                        status.state = "running"
                    result = fn(on_progress, token)
                state, message = "done", "finished"
            except CancelledError:
                result, state, message = None, "cancelled", "cancelled by the user"
            except MuPDError as exc:
                result, state, message = None, "failed", str(exc)
            except Exception as exc:  # a bug: keep the server alive, report it plainly
                traceback.print_exc()
                result, state, message = None, "failed", f"internal error: {type(exc).__name__}: {exc}"
            with self._lock:
                status.state, status.message = state, message
                status.result_path = str(result) if result else None

        thread = threading.Thread(target=run, name=f"mupd-job-{job_id}", daemon=True)
        self._threads[job_id] = thread
        thread.start()
        return self.status(job_id)

    def status(self, job_id: str) -> JobStatus:
        with self._lock:
            if job_id not in self._jobs:
                raise MuPDError(f"no job with id {job_id!r}")
            s = self._jobs[job_id]
            return JobStatus(s.job_id, s.state, s.step, s.total, dict(s.metrics),
                             list(s.history), s.message, s.result_path)

    def cancel(self, job_id: str) -> JobStatus:
        self.status(job_id)  # raises for an unknown id
        self._tokens[job_id].cancel()
        return self.status(job_id)

    def wait(self, job_id: str, timeout: Optional[float] = None) -> JobStatus:
        self._threads[job_id].join(timeout)
        return self.status(job_id)
