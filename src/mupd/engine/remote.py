"""RemoteEngine: the Engine interface over HTTP to a `mupd serve` process (httpx client).

It behaves like LocalEngine: same requests, same results, MuPDErrors with the server's message.
A slide that exists on this machine is read here (the pyramid-level pixels a local run would
read for the region) and uploaded, so the server need not see the file and its result equals
LocalEngine's; a path that does not exist here is sent for the server to read within
its slide roots. Long calls are cancellable (the server is told to stop) and report the
server's progress.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import httpx

from ..errors import CancelledError, MuPDError
from ..progress import CancelToken, ProgressCallback, ProgressEvent
from ..requests import FinetuneRequest
from . import wire
from .api import (
    EngineInfo,
    GenerateRequest,
    GenerateResult,
    JobStatus,
    TranslateRequest,
    TranslateResult,
)

REQUEST_ID_HEADER = "X-MuPD-Request-Id"
TERMINAL_STATES = ("done", "failed", "cancelled")


class EngineUnreachableError(MuPDError):
    """No MuPD server answers at the URL (not started, wrong port, firewall, timeout)."""


class AuthError(MuPDError):
    """The server refused the token."""


class EngineBusyError(MuPDError):
    """The server's device queue is full (HTTP 503); `retry_after` says when to try again."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RemoteError(MuPDError):
    """The server rejected a request; the message is the server's."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def read_token_file(path: str | Path) -> str:
    """The bearer token stored in a file (first line, stripped); never echoed in errors."""
    p = Path(path).expanduser()
    try:
        token = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise MuPDError(f"cannot read token file {p}: {exc.strerror}") from None
    if not token:
        raise MuPDError(f"token file {p} is empty: put a long random secret in it "
                        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


class RemoteEngine:
    """Engine on a remote `mupd serve`; `timeout` bounds each HTTP call (seconds)."""

    def __init__(self, url: str, token: str, timeout: float = 600.0, upload: str = "auto",
                 poll_interval: float = 0.5) -> None:
        if upload not in ("auto", "always", "never"):
            raise MuPDError(f"upload must be 'auto', 'always' or 'never', got {upload!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.upload = upload
        self.poll_interval = poll_interval
        self._headers = {"Authorization": f"Bearer {token}"}
        self._client = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout)
        self._info: Optional[EngineInfo] = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- HTTP plumbing ----------------------------------------------------------------------
    def _call(self, method: str, path: str, client: Optional[httpx.Client] = None,
              **kwargs: Any) -> httpx.Response:
        client = client or self._client
        try:
            response = client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise EngineUnreachableError(
                f"MuPD engine at {self.url} gave no answer to {method} {path} within "
                f"{self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise EngineUnreachableError(
                f"MuPD engine at {self.url} is unreachable ({type(exc).__name__}: {exc}); "
                "is `mupd serve` running there?") from None
        _raise_for_status(response, self.url)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._call(method, path, **kwargs).json()

    def _long_call(self, path: str, content: bytes, content_type: str,
                   progress: Optional[ProgressCallback], cancel: Optional[CancelToken]) -> bytes:
        """POST in a worker thread while this thread relays progress and cancellation."""
        request_id = uuid.uuid4().hex
        headers = {"Content-Type": content_type, REQUEST_ID_HEADER: request_id}
        box: dict[str, Any] = {}

        def post() -> None:
            try:
                box["body"] = self._call("POST", path, content=content, headers=headers).content
            except BaseException as exc:  # handed to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=post, name=f"mupd-remote-{request_id[:8]}", daemon=True)
        worker.start()
        last: Optional[dict] = None
        while worker.is_alive():
            worker.join(self.poll_interval)
            if not worker.is_alive():
                break
            if cancel is not None and cancel.cancelled:
                self._cancel_request(request_id)
                worker.join()
                raise CancelledError("cancelled by the user")
            if progress is not None:
                event = self._request_progress(request_id)
                if event is not None and event != last:
                    last = event
                    progress(ProgressEvent(**event))
        if "error" in box:
            raise box["error"]
        return box["body"]

    def _cancel_request(self, request_id: str) -> None:
        try:
            self._call("POST", f"/requests/{request_id}/cancel")
        except RemoteError:  # already finished
            pass

    def _request_progress(self, request_id: str) -> Optional[dict]:
        try:
            return self._json("GET", f"/requests/{request_id}/progress").get("event")
        except RemoteError:
            return None

    # -- Engine interface -------------------------------------------------------------------
    def info(self) -> EngineInfo:
        self._info = wire.from_json(EngineInfo, self._json("GET", "/info"))
        return self._info

    def load_model(self, path: Optional[str]) -> EngineInfo:
        self._info = wire.from_json(EngineInfo, self._json("POST", "/models/load", json={"path": path}))
        return self._info

    def list_models(self) -> Sequence[str]:
        return list(self._json("GET", "/models")["models"])

    def generate(self, request: GenerateRequest, progress: Optional[ProgressCallback] = None,
                 cancel: Optional[CancelToken] = None) -> GenerateResult:
        body = self._long_call("/generate", wire.encode_generate_request(request),
                               wire.NPZ_MEDIA_TYPE, progress, cancel)
        return wire.decode_generate_result(body)

    def translate(self, request: TranslateRequest, progress: Optional[ProgressCallback] = None,
                  cancel: Optional[CancelToken] = None) -> TranslateResult:
        local = Path(request.slide_path).exists()
        if self.upload == "always" or (self.upload == "auto" and local):
            return self._translate_upload(request, progress, cancel)
        body = self._long_call("/translate", json.dumps(wire.to_json(request)).encode(),
                               "application/json", progress, cancel)
        return wire.decode_translate_result(body)

    def _translate_upload(self, request: TranslateRequest, progress: Optional[ProgressCallback],
                          cancel: Optional[CancelToken]) -> TranslateResult:
        """Send the pyramid-level pixels a local run would read for the region (with where they
        sit in the slide), so the server's tiles, and so its results, equal LocalEngine's."""
        from ..io import open_slide
        from ..regions.outputs import write_layers
        from ..regions.plan import SlideGeometry, TileSpec, plan_region
        from ..regions.source import ArraySlide

        info = self._info or self.info()
        with open_slide(request.slide_path, mpp=request.slide_mpp) as slide:
            if slide.mpp is None:
                raise MuPDError(f"{slide.path}: the slide has no microns-per-pixel value; "
                                "give one (slide_mpp / --mpp)")
            plan = plan_region(SlideGeometry.of(slide), TileSpec(info.tile_size, info.mpp),
                               request.box, request.polygon, request.holes)
            source = ArraySlide.from_slide(slide, plan)
        sent = dataclasses.replace(request, box=plan.box, output_path=None, slide_mpp=None,
                                   slide_path=Path(request.slide_path).name)
        body = self._long_call("/translate",
                               wire.encode_region_upload(sent, source.image, source.mpp, source.frame()),
                               wire.NPZ_MEDIA_TYPE, progress, cancel)
        result = wire.decode_translate_result(body)
        if request.output_path:  # written here, by the writer LocalEngine uses
            result.output_path = str(write_layers(
                result.layers, request.output_path, source=request.slide_path,
                annotation=plan.annotation(), scores=result.scores, cells=result.cells,
                ome_tiff=request.ome_tiff))
        return result

    # -- fine-tuning jobs -------------------------------------------------------------------
    def start_finetune(self, request: FinetuneRequest) -> JobStatus:
        return wire.from_json(JobStatus, self._json("POST", "/jobs/finetune", json=wire.to_json(request)))

    def job_status(self, job_id: str) -> JobStatus:
        return wire.from_json(JobStatus, self._json("GET", f"/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> JobStatus:
        return wire.from_json(JobStatus, self._json("POST", f"/jobs/{job_id}/cancel"))

    def job_events(self, job_id: str) -> Iterator[JobStatus]:
        """The job's status each time it changes, until it ends (the server's NDJSON stream)."""
        try:
            with self._client.stream("GET", f"/jobs/{job_id}/events", timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for_status(response, self.url)
                for line in response.iter_lines():
                    if line.strip():
                        yield wire.from_json(JobStatus, json.loads(line))
        except httpx.TransportError as exc:
            raise EngineUnreachableError(
                f"lost the event stream of job {job_id} from {self.url}: {type(exc).__name__}") from None

    def wait_job(self, job_id: str, timeout: Optional[float] = None, interval: float = 0.5) -> JobStatus:
        """Poll until the job ends (survives a server restart in between, unlike job_events)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                status = self.job_status(job_id)
                if status.state in TERMINAL_STATES:
                    return status
            except EngineUnreachableError:
                if deadline is not None and time.monotonic() > deadline:
                    raise
            if deadline is not None and time.monotonic() > deadline:
                return status
            time.sleep(interval)


def _raise_for_status(response: httpx.Response, url: str) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        detail = response.text or response.reason_phrase
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    code = response.status_code
    if code == 401:
        raise AuthError(f"the MuPD engine at {url} refused the token (HTTP 401): check the token "
                        "file you gave matches the server's")
    if code == 503:
        retry = float(response.headers.get("Retry-After", "1"))
        raise EngineBusyError(f"MuPD engine at {url} is busy: {detail} (retry in {retry:g} s)", retry)
    if code == 409 and "cancel" in detail:
        raise CancelledError(detail)
    raise RemoteError(f"MuPD engine at {url}: {detail} (HTTP {code})", code)
