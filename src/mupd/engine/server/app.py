"""The HTTP routes of one Server: each maps onto an Engine call, refusals onto HTTP statuses."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ...errors import CancelledError, ModelError, MuPDError, OutputExistsError
from ...progress import CancelToken
from ...requests import FinetuneRequest
from .. import wire
from ..api import TranslateRequest
from ..remote import TERMINAL_STATES
from .core import Server
from .errors import AccessDenied, DeviceBusy, NotFound, TooLarge
from .guard import Guard, error_response
from .paths import confine

log = logging.getLogger("mupd.server")


@dataclass
class ModelLoad:
    """The body of POST /models/load (null: the bundled model)."""

    path: Optional[str] = None


def create_app(server: Server, token: str) -> FastAPI:
    """The FastAPI app for one Server; `token` is the bearer secret (never logged)."""
    app = FastAPI(title="MuPD engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, token=token, max_bytes=server.config.max_request_bytes)
    cfg = server.config

    @app.exception_handler(MuPDError)
    async def mupd_error(request: Request, exc: MuPDError) -> JSONResponse:
        if isinstance(exc, DeviceBusy):
            return error_response(503, str(exc), {"Retry-After": str(exc.retry_after)})
        if isinstance(exc, CancelledError):
            return error_response(409, f"request cancelled: {exc}")
        status = {wire.WireError: 422, AccessDenied: 403, NotFound: 404, TooLarge: 413,
                  OutputExistsError: 409}.get(type(exc), 400)
        if isinstance(exc, ModelError) and "does not exist" in str(exc):
            status = 404
        return error_response(status, str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

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
            from ...regions.source import ArraySlide

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
                from ...regions.outputs import check_output_folder

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
    from ...regions.plan import SlideGeometry, TileSpec, plan_region

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
    from ...io import open_slide

    with open_slide(req.slide_path, mpp=req.slide_mpp) as slide:
        _check_output(req, server, slide)
        return server.engine.translate_slide(slide, req, progress=progress, cancel=cancel)
