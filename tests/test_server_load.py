"""16 concurrent clients x 20 requests against a real `mupd serve`: no failures, no mix-ups.

Each request translates one uploaded tile (the smallest real request: the 2-core CI CPU runs
320 of them); every answer is checked against the local engine's output for that tile and seed.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from skimage.data import immunohistochemistry

from mupd.engine.api import TranslateRequest
from mupd.engine.remote import RemoteEngine
from support_server import ServerProcess, save_tiny_model

CLIENTS, REQUESTS = 16, 20
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_concurrent_clients_get_their_own_correct_results(tmp_path, capsys):
    from mupd.engine.local import LocalEngine

    model = save_tiny_model(tmp_path / "model")
    local = LocalEngine(str(model), device="cpu")
    info = local.info()
    marker = next(t["name"] for t in info.targets if t["kind"] == "marker")
    T, image = info.tile_size, immunohistochemistry()
    # 4 different real tiles x 4 seeds: 16 distinct expected answers
    tiles = []
    for i in range(4):
        path = tmp_path / f"tile{i}.png"
        o = i * (min(image.shape[:2]) - T) // 3
        Image.fromarray(image[o : o + T, o : o + T]).save(path)
        tiles.append(str(path))
    cases = [(t, seed) for t in range(4) for seed in range(4)]

    def request(case):
        t, seed = case
        return TranslateRequest(slide_path=tiles[t], stains=[marker], seed=seed, slide_mpp=info.mpp,
                                render_brightfield=False)

    expected = {c: local.translate(request(c)).layers[0].data for c in cases}
    distinct = min(np.abs(expected[a].astype(float) - expected[b]).max()
                   for a in cases for b in cases if a < b)

    server = ServerProcess(tmp_path / "srv", model, ["--max-queue", str(CLIENTS)]).start()
    try:
        def client(k: int) -> list[tuple[float, float]]:
            out = []
            with RemoteEngine(server.url, server.token, timeout=120) as engine:
                for j in range(REQUESTS):
                    case = cases[(k * 7 + j * 3) % len(cases)]
                    start = time.perf_counter()
                    got = engine.translate(request(case)).layers[0].data
                    out.append((time.perf_counter() - start,
                                float(np.abs(got.astype(float) - expected[case]).max())))
            return out

        start = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
        wall = time.perf_counter() - start
        assert server.alive()
    finally:
        server.stop()
    latencies = np.array([r[0] for r in results])
    errors = np.array([r[1] for r in results])
    assert len(results) == CLIENTS * REQUESTS  # no failure (any exception would have raised)
    # A mixed-up answer would differ by at least `distinct`; float noise across processes is tiny.
    assert distinct > 1e-3
    assert errors.max() < min(1e-4, distinct / 10), errors.max()
    with capsys.disabled():
        print(f"\n{CLIENTS} clients x {REQUESTS} translate requests ({T}x{T} tile, {marker}): "
              f"{len(results) / wall:.1f} req/s, wall {wall:.1f} s")
        print("| p50 ms | p95 ms | max ms |\n|---|---|---|")
        print(f"| {np.percentile(latencies, 50) * 1e3:.0f} | {np.percentile(latencies, 95) * 1e3:.0f} "
              f"| {latencies.max() * 1e3:.0f} |")
