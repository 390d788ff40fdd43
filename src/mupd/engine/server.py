"""`mupd serve`: the engine over HTTP (FastAPI + uvicorn) for a GPU machine.

Endpoints mirror the Engine interface (see docs/remote.md). Security: a bearer token compared
in constant time, slide/model paths confined to configured roots (symlinks resolved), request
size limits, loopback by default. One GPU call at a time per device with a bounded queue
(503 + Retry-After when full); fine-tune jobs are persisted in a state folder and resumed
(from the trainer's last checkpoint) when the server starts again.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import stat
import sys
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import CancelledError, ModelError, MuPDError, OutputExistsError
from ..paths import DEFAULT_MODEL, cache_dir
from ..progress import CancelToken, ProgressEvent
from . import wire
from .api import FinetuneRequest, JobStatus, TranslateRequest
from .jobs import JobManager
from .remote import REQUEST_ID_HEADER, TERMINAL_STATES

log = logging.getLogger("mupd.server")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


@dataclass
class ServerConfig:
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


# -- one GPU call at a time -----------------------------------------------------------------
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


# -- paths ----------------------------------------------------------------------------------
def confine(path: str, roots: list[Path], what: str) -> Path:
    """`path` with symlinks resolved, if it lies inside one of `roots` (AccessDenied if not).

    A relative path is taken under the first root where it exists (else under the first root).
    """
    if not roots:
        raise AccessDenied(f"this server has no folder configured for a {what} ({path!r}): "
                           "start it with the matching --slide-root / --model-root option")
    given = Path(path).expanduser()
    try:  # exists() stats each candidate: the OS may refuse the name itself (too long)
        candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in roots]
        resolved = next((c for c in candidates if c.exists()), candidates[0])
    except (OSError, ValueError) as exc:
        shown = ascii(path) if len(path) <= 80 else ascii(path[:80]) + "..."
        raise wire.WireError(f"{what} {shown} cannot be used: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise AccessDenied(f"{what} {path!r} is outside the folders this server may use")
    return resolved


@dataclass
class ModelLoad:
    """The body of POST /models/load (null: the bundled model)."""

    path: Optional[str] = None


# -- the server -----------------------------------------------------------------------------
class Server:
    """The engine, its device slot, fine-tune jobs and their persisted specs."""

    def __init__(self, engine: Any, config: ServerConfig) -> None:
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
        from ..io.atomic import atomic_write_text

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


# -- HTTP -----------------------------------------------------------------------------------
def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    # a message quoting the request could hold a lone surrogate, which UTF-8 cannot carry
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"detail": safe}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: the bearer token (401), then the body size (413, by header or while
    streaming). Plain ASGI, so that handlers still see a client's disconnect."""

    def __init__(self, app: Any, token: str, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self._expected = token.encode("utf-8")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope["path"] != "/health":
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._expected):
                return await _error(401, "missing or wrong bearer token",
                                    {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        length = headers.get(b"content-length")
        limit = f"the server's limit of {self.max_bytes} bytes"
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _error(413, f"request body of {int(length)} bytes exceeds {limit}")(
                scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body exceeds {limit}")
            return message

        return await self.app(scope, limited, send)


def create_app(server: Server, token: str) -> FastAPI:
    """The FastAPI app for one Server; `token` is the bearer secret (never logged)."""
    app = FastAPI(title="MuPD engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, token=token, max_bytes=server.config.max_request_bytes)
    cfg = server.config

    @app.exception_handler(MuPDError)
    async def mupd_error(request: Request, exc: MuPDError) -> JSONResponse:
        if isinstance(exc, DeviceBusy):
            return _error(503, str(exc), {"Retry-After": str(exc.retry_after)})
        if isinstance(exc, CancelledError):
            return _error(409, f"request cancelled: {exc}")
        status = {wire.WireError: 422, AccessDenied: 403, NotFound: 404, TooLarge: 413,
                  OutputExistsError: 409}.get(type(exc), 400)
        if isinstance(exc, ModelError) and "does not exist" in str(exc):
            status = 404
        return _error(status, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error in %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def json_body(request: Request) -> Any:
        return wire.parse_json(await request.body() or b"null")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "device": server.slot.state()}

    @app.get("/info")
    async def info() -> dict:
        return {**wire.to_json(server.engine.info()), "remote": True}

    @app.get("/models")
    async def models() -> dict:
        return {"models": server.list_models()}

    @app.post("/models/load")
    async def load_model(request: Request) -> dict:
        folder = server.model_path(wire.from_json(ModelLoad, await json_body(request)).path)
        info = await server.run_on_device(
            request, "load model", lambda p, c: server.engine.load_model(str(folder) if folder else None))
        server._loadable.add(Path(info.model_path).resolve())
        return {**wire.to_json(info), "remote": True}

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        req = wire.decode_generate_request(await request.body(), 4 * cfg.max_request_bytes)
        if req.num_images > cfg.max_images:
            raise TooLarge(f"num_images={req.num_images}: this server generates 1..{cfg.max_images} per request")
        result = await server.run_on_device(
            request, "generate", lambda p, c: server.engine.generate(req, progress=p, cancel=c))
        return Response(wire.encode_generate_result(result), media_type=wire.NPZ_MEDIA_TYPE)

    @app.post("/translate")
    async def translate(request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        body = await request.body()
        if kind == wire.NPZ_MEDIA_TYPE:
            req, image, mpp, frame = wire.decode_region_upload(body, 4 * cfg.max_request_bytes)
            from ..regions.source import ArraySlide

            if req.output_path:
                raise AccessDenied("an uploaded region's results come back in the response; "
                                   "output_path is for server-side slides")
            slide = ArraySlide(image, mpp, path=f"upload:{Path(req.slide_path).name}", **frame)
            _check_output(req, server, slide)
            work = lambda p, c: server.engine.translate_slide(slide, req, progress=p, cancel=c)  # noqa: E731
        elif kind == "application/json":
            req = wire.translate_request_from_json(wire.parse_json(body))
            req.slide_path = str(server.slide_path(req.slide_path))
            if not Path(req.slide_path).exists():
                raise NotFound(f"slide {req.slide_path} does not exist on the server")
            if req.output_path:
                from ..regions.outputs import check_output_folder

                req.output_path = str(confine(req.output_path, server.slide_roots, "output folder"))
                check_output_folder(req.output_path, remedy="give another output_path (the server "
                                    "never replaces results)")  # before the device queue
            work = lambda p, c: _translate_path(server, req, p, c)  # noqa: E731
        else:
            raise wire.WireError(f"POST /translate takes application/json (a slide path) or "
                                 f"{wire.NPZ_MEDIA_TYPE} (an uploaded region), not {kind or 'no type'!r}")
        result = await server.run_on_device(request, f"translate {Path(req.slide_path).name}", work)
        return Response(wire.encode_translate_result(result), media_type=wire.NPZ_MEDIA_TYPE)

    @app.get("/requests/{request_id}/progress")
    async def request_progress(request_id: str) -> dict:
        event = server.request_entry(request_id)[1][0]
        return {"event": event.to_dict() if event else None}

    @app.post("/requests/{request_id}/cancel")
    async def cancel_request(request_id: str) -> dict:
        server.request_entry(request_id)[0].cancel()
        return {"cancelled": request_id}

    @app.post("/jobs/finetune", status_code=202)
    async def start_finetune(request: Request) -> dict:
        req = wire.from_json(FinetuneRequest, await json_body(request))
        return wire.to_json(server.submit_finetune(req))

    @app.get("/jobs/{job_id}")
    async def job_status(job_id: str) -> dict:
        return wire.to_json(server.job_status(job_id))

    @app.post("/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str) -> dict:
        return wire.to_json(server.cancel_job(job_id))

    @app.get("/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        server.job_status(job_id)  # 404 before the stream starts

        async def stream() -> Any:
            last = None
            while True:
                status = wire.to_json(server.job_status(job_id))
                if status != last:
                    last = status
                    yield json.dumps(status) + "\n"
                if status["state"] in TERMINAL_STATES:
                    return
                await asyncio.sleep(0.2)

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    return app


def _check_output(req: TranslateRequest, server: Server, slide: Any) -> None:
    """413 for a region with more output pixels (at the model's mpp) than the server allows."""
    from ..regions.plan import SlideGeometry, TileSpec, plan_region

    if slide.mpp is None:
        return  # RegionTranslator refuses it with a clear message
    info = server.engine.info()
    plan = plan_region(SlideGeometry.of(slide), TileSpec(info.tile_size, info.mpp),
                       req.box, req.polygon, req.holes)
    out_pixels = plan.n_pixels
    if out_pixels > server.config.max_output_pixels:
        raise TooLarge(f"the region is {out_pixels:.0f} output pixels at the model's mpp, more than "
                       f"this server's per-request limit of {server.config.max_output_pixels}; split it "
                       "into smaller regions or run `mupd stain` on the server")


def _translate_path(server: Server, req: TranslateRequest, progress: Any, cancel: CancelToken) -> Any:
    from ..io import open_slide

    with open_slide(req.slide_path, mpp=req.slide_mpp) as slide:
        _check_output(req, server, slide)
        return server.engine.translate_slide(slide, req, progress=progress, cancel=cancel)


# -- command line ---------------------------------------------------------------------------
def _check_token_file(path: str) -> str:
    from .remote import read_token_file

    token = read_token_file(path)
    mode = Path(path).stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"mupd serve: warning: token file {path} is readable by other users; chmod 600 it",
              file=sys.stderr)
    if len(token) < 16:
        print("mupd serve: warning: the token is short (< 16 characters); use a long random one",
              file=sys.stderr)
    return token


def serve(host: str, port: int, token_file: str, config: ServerConfig, log_level: str = "info") -> None:
    """Load the model, resume unfinished jobs, and serve until interrupted."""
    import uvicorn

    from .local import LocalEngine

    token = _check_token_file(token_file)
    if host not in LOOPBACK:
        bar = "!" * 78
        print(f"{bar}\nWARNING: mupd serve is binding to {host}, not loopback: anyone who can reach "
              f"this port and\nknows the token can run the model and read files under the "
              f"configured roots.\nTraffic is plain HTTP: put a TLS proxy or an SSH tunnel in "
              f"front of it.\n{bar}", file=sys.stderr)
    engine = LocalEngine(config.model, device=config.device, model_roots=config.model_roots)
    server = Server(engine, config)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    resumed = server.resume_jobs()
    if resumed:
        log.info("resumed fine-tune job(s) %s", ", ".join(resumed))
    info = engine.info()
    log.info("serving %s on %s at http://%s:%d", info.model_name, info.device, host, port)
    uvicorn.run(create_app(server, token), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the engine over HTTP (for a GPU machine)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--token-file", required=True, help="file holding the bearer token")
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--slide-root", action="append", default=[], metavar="DIR",
                   help="folder whose slides clients may name (repeatable)")
    p.add_argument("--model-root", action="append", default=[], metavar="DIR",
                   help="folder for loadable models and fine-tune outputs (repeatable)")
    p.add_argument("--state-dir", default=None, help="where fine-tune job specs are kept")
    p.add_argument("--max-request-mb", type=float, default=256)
    p.add_argument("--max-queue", type=int, default=32, help="inference requests that may wait")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_run)


def _run(args: Any) -> int:
    config = ServerConfig(model=args.model, device=args.device, slide_roots=args.slide_root,
                          model_roots=args.model_root, state_dir=args.state_dir,
                          max_request_bytes=int(args.max_request_mb * 2**20), max_waiting=args.max_queue)
    serve(args.host, args.port, args.token_file, config, args.log_level)
    return 0
