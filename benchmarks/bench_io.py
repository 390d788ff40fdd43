"""Region-read overhead of mupd.io against raw tiffslide, and time to the first napari frame.

    .venv/bin/python benchmarks/bench_io.py [--reads 200] [--seed 0]

Reads the same random 512x512 level-0 regions through both, interleaved so that load on a
shared machine hits both alike. Target: median overhead ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "wsi"
SIZE = 512


def _slides() -> list[Path]:
    found = [SHARED / "CMU-1-Small-Region.svs", SHARED / "TCGA-CR-7395-01A-01-TS1.svs"]
    found = [p for p in found if p.exists()]
    if not found:
        from mupd.io.samples import sample_slide_path

        found = [sample_slide_path()]
    return found


def bench_reads(path: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import tiffslide

    from mupd.io import open_slide

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slide = open_slide(path)
    raw = tiffslide.TiffSlide(str(path))
    W, H = slide.dimensions
    rng = np.random.default_rng(seed)
    xs, ys = rng.integers(0, W - SIZE, n), rng.integers(0, H - SIZE, n)
    for i in range(5):  # warm up both (imports, file cache)
        slide.read_region((int(xs[i]), int(ys[i])), (SIZE, SIZE))
        raw.read_region((int(xs[i]), int(ys[i])), 0, (SIZE, SIZE), as_array=True)
    ours, theirs = np.empty(n), np.empty(n)
    for i, (x, y) in enumerate(zip(xs.tolist(), ys.tolist())):
        first_ours = i % 2 == 0
        for which in (("ours", "raw") if first_ours else ("raw", "ours")):
            t = time.perf_counter()
            if which == "ours":
                a = slide.read_region((x, y), (SIZE, SIZE))
                ours[i] = time.perf_counter() - t
            else:
                b = raw.read_region((x, y), 0, (SIZE, SIZE), as_array=True)
                theirs[i] = time.perf_counter() - t
        if i == 0:
            assert np.array_equal(a, b), f"pixels differ from tiffslide on {path.name}"
    slide.close()
    raw.close()
    return ours * 1e3, theirs * 1e3


FIRST_FRAME = r"""
import sys, time
t0 = time.perf_counter()
import napari
viewer = napari.Viewer(show=True)
t1 = time.perf_counter()
viewer.open(sys.argv[1], plugin="napari-mupd")
viewer.screenshot(canvas_only=True)
t2 = time.perf_counter()
print(f"RESULT {t2 - t1:.3f} {t1 - t0:.3f}")
"""


def first_frame(path: Path) -> str:
    """open -> first screenshot under Xvfb in a fresh process (viewer start-up reported apart)."""
    manifest = REPO / "napari_mupd" / "napari.yaml"
    try:
        has_reader = "readers:" in manifest.read_text()
    except OSError:
        has_reader = False
    if not has_reader:
        return "n/a (plugin reader not found)"
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        return "n/a (xvfb-run not found)"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(FIRST_FRAME)
    try:
        proc = subprocess.run([xvfb, "-a", sys.executable, fh.name, str(path)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "QT_QPA_PLATFORM": "xcb"})
    finally:
        os.unlink(fh.name)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if not line:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"n/a (failed: {tail[:100]})"
    frame, startup = line[0].split()[1:]
    return f"{float(frame) * 1e3:.0f} ms (viewer start-up {float(startup):.1f} s, not included)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"random {SIZE}x{SIZE} level-0 reads, n={args.reads}, seed={args.seed}")
    print(f"{'slide':36s} {'mupd med':>9s} {'mupd p95':>9s} {'raw med':>8s} {'raw p95':>8s} {'ratio':>6s}")
    for path in _slides():
        ours, raw = bench_reads(path, args.reads, args.seed)
        med_o, med_r = np.median(ours), np.median(raw)
        print(f"{path.name:36s} {med_o:8.2f}ms {np.percentile(ours, 95):8.2f}ms {med_r:7.2f}ms "
              f"{np.percentile(raw, 95):7.2f}ms {med_o / med_r:6.3f}")
    from mupd.io.samples import sample_slide_path

    print(f"time to first napari frame (sample slide): {first_frame(sample_slide_path())}")


if __name__ == "__main__":
    main()
