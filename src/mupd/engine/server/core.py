"""The Server: one LocalEngine behind a device slot, its calls cancellable and reporting
progress, and fine-tune jobs whose specs are persisted so a restarted server resumes them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import anyio
from fastapi import Request

from ...errors import CancelledError, MuPDError
from ...paths import DEFAULT_MODEL, cache_dir
from ...progress import CancelToken, ProgressEvent
from ...requests import FinetuneRequest
from .. import wire
from ..api import JobStatus
from ..jobs import JobManager
from ..local import LocalEngine
from ..remote import REQUEST_ID_HEADER, TERMINAL_STATES
from .errors import AccessDenied, DeviceBusy, NotFound
from .paths import confine
from .slot import DeviceSlot

log = logging.getLogger("mupd.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ServerConfig:
    """What `mupd serve`'s options set: the model and device, the roots a client may name, limits."""

    model: Optional[str] = None
    device: str = "auto"
    slide_roots: list[str] = field(default_factory=list)
    model_roots: list[str] = field(default_factory=list)
    state_dir: Optional[str] = None
    max_request_bytes: int = 256 * 2**20
    max_output_pixels: int = 8192 * 8192  # per translate request, at the model's mpp
    max_images: int = 64
    max_waiting: int = 32  # inference requests queued for the device
    max_jobs: int = 4  # fine-tune jobs queued or running


class Server:
    """The engine, its device slot, fine-tune jobs and their persisted specs."""

    def __init__(self, engine: LocalEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.slot = DeviceSlot(config.max_waiting)
        self.jobs = JobManager()
        self.slide_roots = [Path(r).expanduser().resolve() for r in config.slide_roots]
        self.model_roots = [Path(r).expanduser().resolve() for r in config.model_roots]
        self.state_dir = Path(config.state_dir) if config.state_dir else cache_dir() / "server"
        (self.state_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self._requests: dict[str, tuple[CancelToken, list[Optional[ProgressEvent]]]] = {}
        self._loadable = {Path(engine.info().model_path).resolve(), DEFAULT_MODEL.resolve()}

    # -- paths
    def slide_path(self, path: str) -> Path:
        return confine(path, self.slide_roots, "slide path")

    def model_path(self, path: Optional[str]) -> Optional[Path]:
        if path is None:
            return None
        p = Path(path).expanduser().resolve()
        if p in self._loadable:
            return p
        return confine(path, self.model_roots, "model folder")

    def list_models(self) -> list[str]:
        allowed = []
        for m in self.engine.list_models():
            try:
                allowed.append(str(self.model_path(m)))
            except AccessDenied:
                pass
        for root in self.model_roots:
            if root.is_dir():
                allowed += [str(p) for p in sorted(root.iterdir())
                            if p.is_dir() and any(p.glob("*.json"))]
        return list(dict.fromkeys(allowed))

    # -- device calls with cancellation and progress, from the event loop
    async def run_on_device(self, request: Request, label: str,
                            fn: Callable[[Callable[[ProgressEvent], None], CancelToken], Any]) -> Any:
        request_id = request.headers.get(REQUEST_ID_HEADER) or os.urandom(8).hex()
        if not _REQUEST_ID.match(request_id):
            raise wire.WireError(f"{REQUEST_ID_HEADER} must be 1-64 letters, digits, '-' or '_'")
        cancel = CancelToken()
        latest: list[Optional[ProgressEvent]] = [None]
        ticket = self.slot.enqueue(label, cancel)  # DeviceBusy (503) before any thread is used
        self._requests[request_id] = (cancel, latest)

        def progress(event: ProgressEvent) -> None:
            latest[0] = event

        def work() -> Any:
            with self.slot.hold(ticket):
                return fn(progress, cancel)

        try:
            task = asyncio.ensure_future(anyio.to_thread.run_sync(work))
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if not cancel.cancelled and await request.is_disconnected():
                    log.warning("client went away during %s: cancelling it", label)
                    cancel.cancel()
        finally:
            self._requests.pop(request_id, None)

    def request_entry(self, request_id: str) -> tuple[CancelToken, list[Optional[ProgressEvent]]]:
        if request_id not in self._requests:
            raise NotFound(f"no request {request_id!r} is running")
        return self._requests[request_id]

    # -- fine-tune jobs, persisted so a restarted server resumes them
    def _record_path(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / f"{job_id}.json"

    def _write_record(self, job_id: str, request: FinetuneRequest, state: str,
                      message: str = "", result_path: Optional[str] = None) -> None:
        """Atomic and fsync'd: a restart after a crash or power cut reads a whole record."""
        from ...io.atomic import atomic_write_text

        atomic_write_text(self._record_path(job_id), json.dumps(
            {"request": wire.to_json(request), "state": state, "message": message,
             "result_path": result_path}))

    def _read_record(self, job_id: str) -> Optional[dict]:
        path = self._record_path(job_id)
        if not re.match(r"^[0-9a-f]{1,32}$", job_id) or not path.exists():
            return None
        return json.loads(path.read_text())

    def submit_finetune(self, request: FinetuneRequest, job_id: Optional[str] = None) -> JobStatus:
        request.data_dir = str(confine(request.data_dir, self.slide_roots, "fine-tune data folder"))
        request.output_dir = str(confine(request.output_dir, self.model_roots, "fine-tune output folder"))
        base = self.model_path(request.base_model)
        request.base_model = str(base) if base else None
        if job_id is None:
            active = sum(self.jobs.status(j).state not in TERMINAL_STATES for j in self._job_ids())
            if active >= self.config.max_jobs:
                raise DeviceBusy(f"{active} fine-tune jobs are already queued or running", retry_after=60)
            job_id = os.urandom(6).hex()
        work = self.engine.finetune_job(request)
        self._write_record(job_id, request, "queued")

        def job(progress: Callable[[ProgressEvent], None], cancel: CancelToken) -> Optional[str]:
            self._write_record(job_id, request, "running")
            try:
                out = work(progress, cancel)
            except CancelledError:
                self._write_record(job_id, request, "cancelled", "cancelled by the user")
                raise
            except BaseException as exc:
                self._write_record(job_id, request, "failed", str(exc))
                raise
            self._write_record(job_id, request, "done", "finished", str(out))
            return out

        @contextmanager
        def gate(token: CancelToken) -> Iterator[None]:
            try:
                with self.slot.job_gate(f"fine-tune job {job_id}", token):
                    yield
            except CancelledError:  # also when cancelled while still queued
                self._write_record(job_id, request, "cancelled", "cancelled by the user")
                raise

        return self.jobs.submit(job, job_id=job_id, gate=gate)

    def _job_ids(self) -> list[str]:
        return [p.stem for p in (self.state_dir / "jobs").glob("*.json")
                if self._known(p.stem)]

    def _known(self, job_id: str) -> bool:
        try:
            self.jobs.status(job_id)
            return True
        except MuPDError:
            return False

    def resume_jobs(self) -> list[str]:
        """Re-submit every job a previous server left queued or running (the trainer resumes
        from its last complete checkpoint in the job's output folder)."""
        resumed = []
        for path in sorted((self.state_dir / "jobs").glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if record["state"] in ("queued", "running"):
                    request = wire.from_json(FinetuneRequest, record["request"])
                    self.submit_finetune(request, job_id=path.stem)
                    resumed.append(path.stem)
            except (MuPDError, ValueError, KeyError) as exc:
                log.error("cannot resume job %s: %s", path.stem, exc)
        return resumed

    def job_status(self, job_id: str) -> JobStatus:
        try:
            return self.jobs.status(job_id)
        except MuPDError:
            record = self._read_record(job_id)
            if record is None:
                raise NotFound(f"no fine-tune job with id {job_id!r}") from None
            return JobStatus(job_id, record["state"], message=record["message"],
                             result_path=record["result_path"])

    def cancel_job(self, job_id: str) -> JobStatus:
        self.job_status(job_id)  # 404 for an unknown id
        if not self._known(job_id):
            return self.job_status(job_id)  # finished before a restart: nothing to cancel
        return self.jobs.cancel(job_id)
