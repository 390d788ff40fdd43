"""`mupd serve`: its options, the token file's checks, and the server's start."""

from __future__ import annotations

import logging
import stat
import sys
from pathlib import Path
from typing import Any

from ..local import LocalEngine
from ..remote import read_token_file
from .app import create_app
from .core import Server, ServerConfig

log = logging.getLogger("mupd.server")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _check_token_file(path: str) -> str:
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
    """Add `mupd serve` to the `mupd` command line (`mupd.cli.COMMAND_MODULES`)."""
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
