"""`mupd serve`: the engine over HTTP (FastAPI + uvicorn) for a GPU machine.

Endpoints mirror the Engine interface (see docs/remote.md). Security: a bearer token compared
in constant time, slide/model paths confined to configured roots (symlinks resolved), request
size limits, loopback by default. One GPU call at a time per device with a bounded queue
(503 + Retry-After when full); fine-tune jobs are persisted in a state folder and resumed
(from the trainer's last checkpoint) when the server starts again.

One module per idea: `errors` (what the server refuses, each an HTTP status), `slot` (one
device call at a time), `paths` (confinement to the configured roots), `core` (the Server: its
engine, device calls with cancellation, persisted fine-tune jobs), `guard` (the bearer token and
body-size middleware), `app` (the routes) and `cli` (`mupd serve`).
"""
