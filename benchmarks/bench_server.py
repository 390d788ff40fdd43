"""Translate (uploaded tile) through `mupd serve` vs the local engine, in the same run.

Prints requests/s and latency for: the local engine in-process, one remote client (the HTTP,
npz and scheduling overhead), and 4 concurrent remote clients; and the overhead ratio.
Runs on CPU; adds a CUDA section when a GPU is present. Usage:
    python benchmarks/bench_server.py [--model DIR] [--requests 40] [--tiles 1]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from skimage.data import immunohistochemistry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(model: str, device: str, work: Path) -> tuple[subprocess.Popen, str, str]:
    token = secrets.token_urlsafe(24)
    (work / "token").write_text(token)
    (work / "token").chmod(0o600)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mupd.cli", "serve", "--port", str(port), "--token-file",
         str(work / "token"), "--model", model, "--device", device, "--state-dir", str(work / "state"),
         "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, token
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start")


def _timed(fn, n: int, clients: int) -> tuple[np.ndarray, float]:
    """Per-request latencies and the wall time of all `n` requests from `clients` threads."""
    def one(_):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = np.array(list(pool.map(one, range(n))))
    return latencies, time.perf_counter() - start


def bench(model: str, device: str, n: int, tiles: int) -> list[tuple]:
    from mupd.engine.api import TranslateRequest
    from mupd.engine.local import LocalEngine
    from mupd.engine.remote import RemoteEngine

    local = LocalEngine(model, device=device)
    info = local.info()
    marker = next(t["name"] for t in info.targets if t["kind"] == "marker")
    side = info.tile_size * tiles
    work = Path(tempfile.mkdtemp(prefix="mupd-bench-"))
    png = work / "roi.png"
    Image.fromarray(np.tile(immunohistochemistry(), (max(1, side // 512 + 1),) * 2 + (1,))[:side, :side]).save(png)
    req = TranslateRequest(slide_path=str(png), stains=[marker], slide_mpp=info.mpp, render_brightfield=False)
    local.translate(req)  # warm-up
    rows = [("local engine", 1, _timed(lambda: local.translate(req), n, 1))]
    proc, url, token = _start_server(model, device, work)
    try:
        engines = [RemoteEngine(url, token, timeout=300) for _ in range(4)]
        engines[0].translate(req)
        rows.append(("remote, 1 client", 1, _timed(lambda: engines[0].translate(req), n, 1)))
        counter = iter(range(10**9))
        rows.append(("remote, 4 clients", 4,
                     _timed(lambda: engines[next(counter) % 4].translate(req), n, 4)))
    finally:
        proc.terminate()
        proc.wait(15)
    return [(f"{device}: {name}", clients, lat, side) for name, clients, lat in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: bundled, else a tiny untrained one)")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--tiles", type=int, default=1, help="region side in model tiles")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from mupd.paths import DEFAULT_MODEL

    model = args.model or (str(DEFAULT_MODEL) if DEFAULT_MODEL.is_dir() else None)
    if model is None:
        from mupd.pipeline import MuPDPipeline

        model = tempfile.mkdtemp(prefix="mupd-tiny-")
        MuPDPipeline.from_config_name("tiny").save_pretrained(model)
        print("(no bundled model: using an untrained tiny model; speed only)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [r for d in devices for r in bench(model, d, args.requests, args.tiles)]
    print(f"\ntranslate of an uploaded {rows[0][3]}x{rows[0][3]} px region, {args.requests} requests each")
    print("| setting | clients | req/s | p50 ms | p95 ms | overhead vs local (p50) |")
    print("|---|---|---|---|---|---|")
    base = {}
    for name, clients, (lat, wall), _ in rows:
        device = name.split(":")[0]
        p50 = np.percentile(lat, 50)
        base.setdefault(device, p50)
        rate = len(lat) / wall
        print(f"| {name} | {clients} | {rate:.1f} | {p50 * 1e3:.1f} | {np.percentile(lat, 95) * 1e3:.1f} "
              f"| {p50 / base[device]:.2f}x |")


if __name__ == "__main__":
    main()
