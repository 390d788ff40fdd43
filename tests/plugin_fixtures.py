"""Helpers shared by the plugin tests: a display guard and an independent 'something is drawn' check."""

from __future__ import annotations

import os

import numpy as np
import pytest

needs_display = pytest.mark.skipif(
    not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen",
    reason="needs a display: run under `xvfb-run -a` (make test does)",
)


def drawn_stats(screenshot: np.ndarray) -> tuple[float, float]:
    """(pixel std, fraction of pixels brighter than the black canvas) of an RGB(A) screenshot."""
    rgb = np.asarray(screenshot)[..., :3].astype(np.float32)
    return float(rgb.std()), float((rgb.max(axis=-1) > 10).mean())
