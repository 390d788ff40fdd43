"""Region-read overhead of mupd.io against raw tiffslide, and time to the first napari frame.

    xvfb-run -a .venv/bin/python benchmarks/bench_io.py [--reads 200] [--seed 0] [--frames 5]

Reads the same random 512x512 level-0 regions through both, interleaved so that load on a
shared machine hits both alike. Target: median overhead ratio <= 1.15.
First frame: the sample slide opened through the plugin reader (`napari_mupd._reader`) into a
hidden `napari.Viewer(show=False)` until its first screenshot is drawn, against napari drawing the
same level-0 pixels handed over as a numpy array, in one process (without a DISPLAY it starts
itself under xvfb-run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

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
import json, sys, time
import numpy as np
import napari
from napari_mupd._reader import napari_get_reader

path, reps = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
viewer = napari.Viewer(show=False)
viewer.screenshot(canvas_only=True)  # GL context and first empty draw: start-up, not counted
startup = time.perf_counter() - t0


def plugin():
    # what napari does on File > Open: get the reader, read layer data, add the layers, draw
    t = time.perf_counter()
    for data, kwargs, kind in napari_get_reader(path)(path):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    viewer.screenshot(canvas_only=True)
    return time.perf_counter() - t


reader = napari_get_reader(path)(path)
level0 = reader[0][0][0] if reader[0][1].get("multiscale") else reader[0][0]
t = time.perf_counter()
array = np.asarray(level0)  # decoded once, outside the baseline's timing
decode = time.perf_counter() - t


def baseline():
    # the same level-0 pixels already in memory as a plain numpy image: napari's own floor
    t = time.perf_counter()
    viewer.add_image(array, rgb=array.shape[-1] == 3)
    viewer.screenshot(canvas_only=True)
    return time.perf_counter() - t


times = {"plugin": [], "numpy": []}
for i in range(reps):  # interleaved, alternating order, so machine load hits both alike
    for name in (("plugin", "numpy") if i % 2 == 0 else ("numpy", "plugin")):
        times[name].append(plugin() if name == "plugin" else baseline())
        viewer.layers.clear()
viewer.close()
print("RESULT " + json.dumps({"startup": startup, "decode": decode, "shape": list(array.shape), **times}))
"""


def first_frame(path: Path, reps: int = 5) -> Optional[dict]:
    """Open through the plugin reader -> first drawn frame of a hidden viewer (offscreen
    screenshot), against the same level-0 pixels added as a numpy image, in one fresh process
    under Xvfb. None when there is no display server or the run failed (the reason is printed)."""
    xvfb = shutil.which("xvfb-run")
    command = [sys.executable, "-c", FIRST_FRAME, str(path), str(reps)]
    if not os.environ.get("DISPLAY"):
        if xvfb is None:
            print("first napari frame: n/a (no DISPLAY and no xvfb-run)")
            return None
        command = [xvfb, "-a", *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "QT_QPA_PLATFORM": "xcb"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"first napari frame: n/a (failed: {tail[:200]})")
        return None
    return json.loads(line[0][len("RESULT "):])


def print_first_frame(path: Path, reps: int) -> None:
    result = first_frame(path, reps)
    if result is None:
        return
    plugin, numpy_ = np.array(result["plugin"]) * 1e3, np.array(result["numpy"]) * 1e3
    h, w = result["shape"][:2]
    print(f"\ntime to first napari frame, {path.name} ({w}x{h} px level 0), hidden viewer under "
          f"Xvfb, n={reps} each, interleaved")
    print(f"{'path':44s} {'median':>8s} {'min':>8s} {'max':>8s}")
    print(f"{'plugin reader (lazy dask pyramid)':44s} {np.median(plugin):6.0f}ms {plugin.min():6.0f}ms "
          f"{plugin.max():6.0f}ms")
    print(f"{'baseline: level 0 as a numpy image':44s} {np.median(numpy_):6.0f}ms {numpy_.min():6.0f}ms "
          f"{numpy_.max():6.0f}ms")
    print(f"first (cold) plugin open {plugin[0]:.0f} ms, first numpy image {numpy_[0]:.0f} ms")
    decode = result["decode"] * 1e3
    print(f"ratio plugin / baseline (medians): {np.median(plugin) / np.median(numpy_):.2f}; "
          f"with the baseline's one-off decode of level 0 ({decode:.0f} ms) added: "
          f"{np.median(plugin) / (np.median(numpy_) + decode):.2f}; viewer start-up "
          f"{result['startup']:.1f} s not counted")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=5, help="repeats of the first-frame measurement")
    args = ap.parse_args()
    print(f"random {SIZE}x{SIZE} level-0 reads, n={args.reads}, seed={args.seed}")
    print(f"{'slide':36s} {'mupd med':>9s} {'mupd p95':>9s} {'raw med':>8s} {'raw p95':>8s} {'ratio':>6s}")
    for path in _slides():
        ours, raw = bench_reads(path, args.reads, args.seed)
        med_o, med_r = np.median(ours), np.median(raw)
        print(f"{path.name:36s} {med_o:8.2f}ms {np.percentile(ours, 95):8.2f}ms {med_r:7.2f}ms "
              f"{np.percentile(raw, 95):7.2f}ms {med_o / med_r:6.3f}")
    from mupd.io.samples import sample_slide_path

    print_first_frame(Path(sample_slide_path()), args.frames)


if __name__ == "__main__":
    main()
