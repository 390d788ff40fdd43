"""Beer-Lambert DAB rendering of a marker map on the source hematoxylin, checked by colour
deconvolution on real images: scikit-image's IHC (FHL2, colon) and the CMU H&E slide."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2hed
from skimage.data import immunohistochemistry

from mupd.errors import ConditionError
from mupd.io import open_slide
from mupd.render import DAB_MAX, render_dab_ihc
from test_slides_support import cmu_slide_path


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(Pearson r, slope) of y on x."""
    return float(np.corrcoef(x.ravel(), y.ravel())[0, 1]), float(np.polyfit(x.ravel(), y.ravel(), 1)[0])


def test_dab_comes_back_proportional_to_the_marker_and_hematoxylin_is_kept():
    ihc = immunohistochemistry()
    hed = rgb2hed(ihc)
    # the real image's own DAB, as a marker map in [0, 1], and an unrelated ramp
    own = np.clip(hed[..., 2] / np.percentile(hed[..., 2], 99), 0, 1).astype(np.float32)
    ramp = np.tile(np.linspace(0, 1, ihc.shape[1], dtype=np.float32), (ihc.shape[0], 1))
    out = render_dab_ihc(np.stack([ihc, ihc]), np.stack([own, ramp]))
    assert out.dtype == np.uint8 and out.shape == (2,) + ihc.shape
    for rendered, marker in zip(out, (own, ramp)):
        back = rgb2hed(rendered)
        r, slope = _fit(marker, back[..., 2])
        assert r > 0.999 and slope == pytest.approx(DAB_MAX, rel=0.02)
        r, slope = _fit(hed[..., 0], back[..., 0])
        assert r > 0.999 and slope == pytest.approx(1.0, rel=0.02)


def test_dab_scale_is_strong_staining_in_the_real_ihc():
    dab = rgb2hed(immunohistochemistry())[..., 2]
    assert np.percentile(dab, 99) == pytest.approx(DAB_MAX, abs=0.02)


def test_real_he_loses_its_eosin_and_keeps_its_nuclei(shared_data):
    with open_slide(cmu_slide_path(shared_data)) as slide:
        he = slide.read_region((800, 1200), (256, 256))[..., :3]
    hed = rgb2hed(he)
    zero = np.zeros(he.shape[:2], dtype=np.float32)
    back = rgb2hed(render_dab_ihc(he[None], zero[None])[0])
    assert np.abs(hed[..., 1]).mean() > 20 * np.abs(back[..., 1]).mean()  # eosin gone
    assert np.abs(back[..., 2]).mean() < 0.005  # no DAB where the marker is 0
    assert _fit(hed[..., 0], back[..., 0])[0] > 0.97  # nuclei where they were (0.98: uint8 rounding)


def test_mismatched_shapes_name_both():
    with pytest.raises(ConditionError, match=r"\(1, 8, 8, 3\).*\(1, 4, 4\)"):
        render_dab_ihc(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 4, 4), np.float32))
