"""Peak memory of `mupd stain` on a real HER2ST section, measured in a fresh process.

The region is cut to fit the test's time budget on a 2-core CPU, and the blending sums are forced
onto disk (the path a whole section takes: it is above IN_MEMORY_LIMIT_PX), so the memory seen
here is the whole-section memory: the decoded JPEG plus one batch plus bounded dask chunks. The
whole-section run itself is measured in docs/slides.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support_slides import model_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RSS_LIMIT_MB = 4096
SCRIPT = r"""
import json, sys, time
import mupd.regions.blend
from mupd.cli import main

mupd.regions.blend.IN_MEMORY_LIMIT_PX = 0  # disk-backed sums, as for a whole section
start = time.perf_counter()
code = main(sys.argv[1:])
# VmHWM belongs to this process's own address space; ru_maxrss would also carry the high-water
# mark of the (large, long-running) pytest process this one was forked from.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "peak_rss_mb": hwm / 1024}))
"""


def test_her2st_section_region_stays_under_4_gb(shared_data, tmp_path):
    model = model_folder(tmp_path)
    section = shared_data / "st/her2st/images/C2_HE.jpg"  # 9274 x 9911 px, ~0.69 um/px
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, "stain", str(section), "--mpp", "0.69", "--stains", "Ki67",
         "--box", "3000", "3500", "2400", "2400", "--out", str(out), "--model", str(model),
         "--device", "cpu"], capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"HER2ST C2 region 2400x2400 px: {stats['seconds']:.1f} s, peak RSS {stats['peak_rss_mb']:.0f} MB")
    assert stats["code"] == 0 and stats["peak_rss_mb"] < RSS_LIMIT_MB
    assert {p.name for p in out.iterdir()} == {"Ki67.ome.zarr", "IHC-Ki67.ome.zarr", "scores-Ki67.geojson",
                                               "scores.csv"}
