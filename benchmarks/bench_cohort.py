"""`mupd stain` over a cohort on 1 and on N processes (torchrun, gloo on the CPU).

    .venv/bin/python benchmarks/bench_cohort.py [--slides 4] [--size 800] [--processes 2]

The slides are square crops of the CMU sample slide (0.499 um/px) written as small pyramidal
OME-TIFFs, stained with HER2 + Ki67 and their renderings by the bundled model. Wall seconds
include each process's start and model load; `slide seconds` is the sum of the table's
`seconds` column (plan, tiles, blending, rendering). The outputs of both runs are compared.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _crops(folder: Path, n: int, size: int) -> None:
    from mupd.io import open_slide, write_ome_tiff
    from mupd.io.samples import sample_slide_path

    path = CMU if CMU.exists() else sample_slide_path()
    with open_slide(path) as slide:
        W, H = slide.dimensions
        for i in range(n):  # down the tissue strip of the slide
            x, y = (W - size) // 2 - 300, 300 + i * (H - 600 - size) // max(1, n - 1)
            image = np.asarray(slide.levels[0][y : y + size, x : x + size])[..., :3]
            write_ome_tiff(folder / f"crop-{i:02d}.ome.tif", image, mpp=slide.mpp[0])


def _run(processes: int, slides: Path, out: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ([sys.executable] if processes == 1 else
              [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={port}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src")}
    start = time.perf_counter()
    subprocess.run([*launch, "-m", "mupd.cli", "stain", str(slides), "--stains", "HER2", "Ki67",
                    "--out", str(out), "--device", "cpu"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=800, help="crop side, level-0 pixels")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    from mupd.io import open_slide

    with tempfile.TemporaryDirectory() as tmp:
        slides = Path(tmp) / "slides"
        slides.mkdir()
        _crops(slides, args.slides, args.size)
        runs = {}
        for n in (1, args.processes):
            out = Path(tmp) / f"out-{n}"
            wall = _run(n, slides, out)
            with open(out / "cohort.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            runs[n] = out
            print(f"{n} process(es): {len(rows)} slides, {sum(int(r['tiles']) for r in rows)} tiles "
                  f"({sum(int(r['tissue_tiles']) for r in rows)} tissue), slide seconds "
                  f"{sum(float(r['seconds']) for r in rows):.1f}, wall {wall:.1f} s")
        same = all(np.array_equal(np.asarray(open_slide(p).levels[0]),
                                  np.asarray(open_slide(runs[args.processes] / p.relative_to(runs[1])).levels[0]))
                   for p in sorted(runs[1].glob("*/*.ome.zarr")))
        print(f"outputs identical: {same}")


if __name__ == "__main__":
    main()
